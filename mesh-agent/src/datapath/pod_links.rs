//! Finding each local pod's host-side interface, where its tc programs attach.
//!
//! Route-based CNIs (Calico, kindnet, the sandbox's default) give each pod a `/32` host
//! route to its veth: the route names the interface. Bridge-based CNIs (flannel, the
//! `bridge` plugin) hang the pods' veths off a bridge with one route for the whole pod
//! subnet, so the interface is found from the pod's side instead: among the named network
//! namespaces (`ip netns`, where containerd and CRI-O pin pods' namespaces), the one whose
//! interface holds the pod's address is one end of a veth pair, and its peer index names
//! the host end. The host end must point back at that namespace, so a namespace cannot
//! claim another node's or another pod's interface.
//!
//! The parsing is pure and unit-tested; `PodLinks::find` runs `ip` for the facts, and
//! `survey` for the shape `meshctl check` reports.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    net::Ipv4Addr,
    process::Command,
};

use serde_json::Value;

/// A local pod's host-side interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub veth: String,
    pub ifindex: u32,
    /// Set when the veth is a port of a bridge.
    pub bridge: Option<BridgePort>,
}

/// The link-layer addresses `tc_from_pod` needs for a pod on a bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgePort {
    /// The MAC address of the pod's own interface.
    pub pod_mac: [u8; 6],
    /// The host-side veth's MAC address: the bridge delivers frames addressed to it to
    /// the node's stack, and it lasts as long as the port (the bridge's own address
    /// follows its ports).
    pub port_mac: [u8; 6],
    /// The bridge's interface index, where the pod's packets reach the node's stack.
    pub bridge_ifindex: u32,
}

/// An interface of this network namespace, as `ip -j -d link show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostLink {
    name: String,
    ifindex: u32,
    kind: Option<String>,
    master: Option<String>,
    mac: Option<[u8; 6]>,
    /// The namespace of the peer (veth), by its id in this namespace.
    peer_netns: Option<u32>,
}

/// An IPv4 address of a pod namespace's interface whose peer lives elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PodSideAddress {
    ip: Ipv4Addr,
    peer_ifindex: u32,
    mac: [u8; 6],
}

/// Finds pods' interfaces, remembering what it read in each pod namespace (a namespace's
/// addresses are read again only while it has none, as when the CNI has not finished).
#[derive(Default)]
pub struct PodLinks {
    seen: HashMap<String, Vec<PodSideAddress>>,
}

impl PodLinks {
    /// The host-side interface of each pod address of `ips` that has one yet.
    pub fn find(&mut self, ips: &[Ipv4Addr]) -> HashMap<Ipv4Addr, PodLink> {
        let routes = fs::read_to_string("/proc/net/route").unwrap_or_default();
        let routed = host_routes(&routes);
        let mut found = HashMap::new();
        let mut bridged = Vec::new();
        for ip in ips {
            match routed
                .get(ip)
                .and_then(|iface| Some((iface, super::ifindex(iface)?)))
            {
                Some((iface, ifindex)) => {
                    found.insert(
                        *ip,
                        PodLink {
                            veth: iface.clone(),
                            ifindex,
                            bridge: None,
                        },
                    );
                }
                None => bridged.push(*ip),
            }
        }
        if !bridged.is_empty() {
            match self.read_pod_namespaces(&bridged) {
                Ok(links) => found.extend(links),
                Err(err) => tracing::warn!("finding pods' interfaces from their namespaces: {err}"),
            }
        }
        found
    }

    fn read_pod_namespaces(
        &mut self,
        ips: &[Ipv4Addr],
    ) -> Result<HashMap<Ipv4Addr, PodLink>, String> {
        let host = parse_links(&ip_json(&["-d", "link", "show"])?);
        let namespaces = parse_netns_ids(&ip_json(&["netns", "list"])?);
        // Only namespaces with a veth peer here can hold a local pod's interface.
        let peers: Vec<(String, u32)> = namespaces
            .into_iter()
            .filter(|(_, id)| host.iter().any(|l| l.peer_netns == Some(*id)))
            .collect();
        self.seen
            .retain(|name, _| peers.iter().any(|(n, _)| n == name));
        for (name, _) in &peers {
            if self.seen.get(name).is_some_and(|a| !a.is_empty()) {
                continue;
            }
            match ip_json(&["-n", name, "addr", "show"]) {
                Ok(listing) => {
                    self.seen.insert(name.clone(), parse_pod_side(&listing));
                }
                Err(err) => tracing::debug!("reading namespace {name}: {err}"),
            }
        }
        let mut found = HashMap::new();
        for (name, id) in &peers {
            for address in self.seen.get(name).into_iter().flatten() {
                if !ips.contains(&address.ip) {
                    continue;
                }
                if let Some(link) = host_end(&host, *id, address) {
                    found.insert(address.ip, link);
                }
            }
        }
        Ok(found)
    }
}

/// The host end of a pod-side address: the veth at its peer index whose own peer is in
/// the pod's namespace, with the bridge it is a port of.
fn host_end(host: &[HostLink], netns_id: u32, address: &PodSideAddress) -> Option<PodLink> {
    let veth = host.iter().find(|l| {
        l.ifindex == address.peer_ifindex
            && l.peer_netns == Some(netns_id)
            && l.kind.as_deref() == Some("veth")
    })?;
    let bridge = veth.master.as_ref().and_then(|master| {
        let bridge = host
            .iter()
            .find(|l| &l.name == master && l.kind.as_deref() == Some("bridge"))?;
        Some(BridgePort {
            pod_mac: address.mac,
            port_mac: veth.mac?,
            bridge_ifindex: bridge.ifindex,
        })
    });
    Some(PodLink {
        veth: veth.name.clone(),
        ifindex: veth.ifindex,
        bridge,
    })
}

/// How this node's CNI wires its pods: the host ends of veth pairs whose peer is in
/// another namespace, by how the mesh can find their pods.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CniShape {
    /// With a `/32` route to their pod.
    pub routed: Vec<String>,
    /// Ports of a Linux bridge.
    pub bridged: Vec<String>,
    /// Ports of another kind of master (Open vSwitch, a bond, …) and no `/32` route: the
    /// mesh cannot attach their pods. Each with its master.
    pub unattachable: Vec<(String, String)>,
}

impl CniShape {
    /// Every pod veth, routed, bridged or not.
    pub fn veths(&self) -> impl Iterator<Item = &str> {
        self.routed
            .iter()
            .chain(&self.bridged)
            .map(String::as_str)
            .chain(self.unattachable.iter().map(|(veth, _)| veth.as_str()))
    }
}

/// Reads this namespace's links and routes (`ip -j -d link show`, `/proc/net/route`).
pub fn survey() -> Result<CniShape, String> {
    let links = parse_links(&ip_json(&["-d", "link", "show"])?);
    let routes = fs::read_to_string("/proc/net/route")
        .map_err(|err| format!("reading /proc/net/route: {err}"))?;
    Ok(classify(&links, &host_routes(&routes)))
}

/// Sorts the veths with a peer elsewhere. One with neither a `/32` route nor a master
/// (a namespace's own uplink, an address not yet given) is not a pod's and is left out.
fn classify(links: &[HostLink], routes: &BTreeMap<Ipv4Addr, String>) -> CniShape {
    let routed: std::collections::BTreeSet<&str> = routes.values().map(String::as_str).collect();
    let kind_of = |name: &str| {
        links
            .iter()
            .find(|link| link.name == name)
            .and_then(|link| link.kind.as_deref())
    };
    let mut shape = CniShape::default();
    for link in links {
        if link.kind.as_deref() != Some("veth") || link.peer_netns.is_none() {
            continue;
        }
        let name = link.name.clone();
        match link.master.as_deref() {
            _ if routed.contains(link.name.as_str()) => shape.routed.push(name),
            Some(master) if kind_of(master) == Some("bridge") => shape.bridged.push(name),
            Some(master) => shape.unattachable.push((
                name,
                format!("{master} ({})", kind_of(master).unwrap_or("unknown kind")),
            )),
            None => {}
        }
    }
    shape
}

fn ip_json(args: &[&str]) -> Result<Value, String> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .map_err(|e| format!("running ip -j {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip -j {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // `ip netns list` prints nothing at all when there is no namespace.
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("ip -j {}: unreadable output: {e}", args.join(" ")))
}

/// Pod address → interface, from the `/32` routes of `/proc/net/route`.
fn host_routes(table: &str) -> BTreeMap<Ipv4Addr, String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() <= 7 || cols[7] != "FFFFFFFF" {
                return None;
            }
            let destination = u32::from_str_radix(cols[1], 16).ok()?;
            Some((
                Ipv4Addr::from(destination.to_le_bytes()),
                cols[0].to_owned(),
            ))
        })
        .collect()
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn parse_links(listing: &Value) -> Vec<HostLink> {
    let Some(links) = listing.as_array() else {
        return Vec::new();
    };
    links
        .iter()
        .filter_map(|link| {
            Some(HostLink {
                name: link["ifname"].as_str()?.to_owned(),
                ifindex: u32::try_from(link["ifindex"].as_u64()?).ok()?,
                kind: link["linkinfo"]["info_kind"].as_str().map(str::to_owned),
                master: link["master"].as_str().map(str::to_owned),
                mac: link["address"].as_str().and_then(parse_mac),
                peer_netns: link["link_netnsid"]
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok()),
            })
        })
        .collect()
}

/// Named namespaces that have an id in this one (`ip -j netns list`).
fn parse_netns_ids(listing: &Value) -> Vec<(String, u32)> {
    let Some(namespaces) = listing.as_array() else {
        return Vec::new();
    };
    namespaces
        .iter()
        .filter_map(|ns| {
            Some((
                ns["name"].as_str()?.to_owned(),
                u32::try_from(ns["id"].as_u64()?).ok()?,
            ))
        })
        .collect()
}

/// The IPv4 addresses of a pod namespace's interfaces that have a peer elsewhere
/// (`ip -j addr show` run in it).
fn parse_pod_side(listing: &Value) -> Vec<PodSideAddress> {
    let Some(links) = listing.as_array() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for link in links {
        let (Some(peer), Some(mac)) = (
            link["link_index"]
                .as_u64()
                .and_then(|i| u32::try_from(i).ok()),
            link["address"].as_str().and_then(parse_mac),
        ) else {
            continue;
        };
        if link["link_netnsid"].is_null() {
            continue;
        }
        for address in link["addr_info"].as_array().into_iter().flatten() {
            if address["family"] != "inet" {
                continue;
            }
            if let Some(ip) = address["local"].as_str().and_then(|a| a.parse().ok()) {
                found.push(PodSideAddress {
                    ip,
                    peer_ifindex: peer,
                    mac,
                });
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);

    /// A node with a routed pod on `cali1`, a bridged one on `veth2` off `cni0`, a veth
    /// whose peer is in namespace 3 but at another index, and a bond port.
    fn node_links() -> Value {
        serde_json::json!([
            {"ifindex": 1, "ifname": "lo", "address": "00:00:00:00:00:00"},
            {"ifindex": 5, "ifname": "cni0", "address": "aa:bb:cc:00:00:01",
             "linkinfo": {"info_kind": "bridge"}},
            {"ifindex": 6, "ifname": "veth2", "master": "cni0", "address": "aa:bb:cc:00:00:02",
             "link_netnsid": 0, "linkinfo": {"info_kind": "veth", "info_slave_kind": "bridge"}},
            {"ifindex": 7, "ifname": "cali1", "address": "ee:ee:ee:ee:ee:ee",
             "link_netnsid": 1, "linkinfo": {"info_kind": "veth"}},
            {"ifindex": 8, "ifname": "veth3", "master": "bond0", "address": "aa:bb:cc:00:00:03",
             "link_netnsid": 2, "linkinfo": {"info_kind": "veth"}},
            {"ifindex": 9, "ifname": "bond0", "address": "aa:bb:cc:00:00:04",
             "linkinfo": {"info_kind": "bond"}},
        ])
    }

    fn pod_side(peer: u32, ip: &str) -> Value {
        serde_json::json!([
            {"ifindex": 1, "ifname": "lo", "address": "00:00:00:00:00:00",
             "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
            {"ifindex": 2, "link_index": peer, "ifname": "eth0", "address": "0a:58:0a:f4:01:02",
             "link_netnsid": 0, "addr_info": [
                {"family": "inet", "local": ip, "prefixlen": 24},
                {"family": "inet6", "local": "fe80::858:aff:fef4:102", "prefixlen": 64}]},
        ])
    }

    #[test]
    fn a_bridged_pod_is_found_at_the_peer_of_its_interface_with_both_mac_addresses() {
        let host = parse_links(&node_links());
        let addresses = parse_pod_side(&pod_side(6, "10.244.1.2"));
        assert_eq!(
            addresses,
            [PodSideAddress {
                ip: POD,
                peer_ifindex: 6,
                mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x02],
            }],
            "loopback and IPv6 addresses are not a pod's"
        );
        assert_eq!(
            host_end(&host, 0, &addresses[0]),
            Some(PodLink {
                veth: "veth2".into(),
                ifindex: 6,
                bridge: Some(BridgePort {
                    pod_mac: [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x02],
                    port_mac: [0xaa, 0xbb, 0xcc, 0, 0, 2],
                    bridge_ifindex: 5,
                }),
            })
        );
    }

    #[test]
    fn a_namespace_cannot_claim_an_interface_whose_peer_is_elsewhere() {
        let host = parse_links(&node_links());
        // veth2's peer is in namespace 0: a namespace with id 3 naming index 6 lies.
        let address = parse_pod_side(&pod_side(6, "10.244.1.2"))[0];
        assert_eq!(host_end(&host, 3, &address), None);
        // Index 5 is the bridge itself, not a veth.
        let address = PodSideAddress {
            peer_ifindex: 5,
            ..address
        };
        assert_eq!(host_end(&host, 0, &address), None);
    }

    #[test]
    fn a_veth_off_a_master_that_is_not_a_bridge_is_attached_as_routed() {
        let host = parse_links(&node_links());
        let address = PodSideAddress {
            ip: POD,
            peer_ifindex: 8,
            mac: [2, 0, 0, 0, 0, 1],
        };
        let link = host_end(&host, 2, &address).expect("the veth");
        assert_eq!((link.veth.as_str(), link.bridge), ("veth3", None));
    }

    #[test]
    fn the_cni_shape_sorts_pod_veths_by_how_their_pods_are_found() {
        let links = parse_links(&node_links());
        let routes = BTreeMap::from([(POD, "cali1".to_owned())]);
        assert_eq!(
            classify(&links, &routes),
            CniShape {
                routed: vec!["cali1".into()],
                bridged: vec!["veth2".into()],
                unattachable: vec![("veth3".into(), "bond0 (bond)".into())],
            }
        );
        // Without its route, a veth without a master is not taken for a pod's.
        let shape = classify(&links, &BTreeMap::new());
        assert!(shape.routed.is_empty());
        assert_eq!(shape.veths().collect::<Vec<_>>(), ["veth2", "veth3"]);
    }

    #[test]
    fn host_routes_are_the_32_bit_routes_of_the_table() {
        let table = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                     eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n\
                     cni0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
                     cali1\t0201F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\n";
        assert_eq!(
            host_routes(table),
            BTreeMap::from([(POD, "cali1".to_owned())])
        );
    }

    #[test]
    fn namespaces_without_an_id_here_and_bad_addresses_are_skipped() {
        let listing = serde_json::json!([{"name": "cni-1", "id": 0}, {"name": "other"}]);
        assert_eq!(parse_netns_ids(&listing), [("cni-1".to_owned(), 0)]);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee:ff:00"), None);
        assert_eq!(parse_mac("aa:bb:cc:dd:ee"), None);
        assert_eq!(parse_mac("zz:bb:cc:dd:ee:ff"), None);
    }
}

//! The agent process's own CPU time and memory under Prometheus' standard names
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`), read from
//! `/proc/self` at each scrape: what `meshctl impact` divides by the requests served.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// A Prometheus collector of this process's CPU seconds and resident memory.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        // SAFETY: sysconf only reads a configuration value.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let cpu = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| cpu_seconds(&stat, u64::try_from(ticks).ok()?));
        let resident = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|statm| resident_bytes(&statm, u64::try_from(page).ok()?));
        if let Some(seconds) = cpu {
            let metric = ConstCounter::new(seconds);
            metric.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                metric.metric_type(),
            )?)?;
        }
        if let Some(bytes) = resident {
            let metric = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
            metric.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                None,
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// User plus system CPU time from `/proc/<pid>/stat`, in seconds; `ticks` per second.
fn cpu_seconds(stat: &str, ticks: u64) -> Option<f64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')': the
    // fields after it start past the last ')'. utime and stime are fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    (ticks > 0).then(|| (user + system) as f64 / ticks as f64)
}

/// Resident memory from `/proc/<pid>/statm` (its second field, in pages), in bytes.
fn resident_bytes(statm: &str, page: u64) -> Option<u64> {
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_user_plus_system_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (mesh agent) (x)) S 1 4242 4242 0 -1 4194560 2000 0 0 0 \
                    250 50 0 0 20 0 9 0 100 50000000 3000 18446744073709551615";
        assert_eq!(cpu_seconds(stat, 100), Some(3.0));
        assert_eq!(cpu_seconds(stat, 0), None);
        assert_eq!(cpu_seconds("4242 (agent) S 1", 100), None);
        assert_eq!(cpu_seconds("no parenthesis", 100), None);
    }

    #[test]
    fn resident_memory_is_the_second_field_in_pages() {
        assert_eq!(
            resident_bytes("5000 1200 300 10 0 900 0\n", 4096),
            Some(1200 * 4096)
        );
        assert_eq!(resident_bytes("5000", 4096), None);
        assert_eq!(resident_bytes("5000 x", 4096), None);
    }

    #[test]
    fn this_process_reports_both() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
    }
}

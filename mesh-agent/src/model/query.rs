//! A request's query string as Envoy's route matchers and hash policies read it: shared by
//! routing (`queryParams` matches) and consistent hashing (`httpQueryParameterName`).

/// The first value of query parameter `name` (Envoy matches the first).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| value.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_value_of_a_parameter_is_read() {
        assert_eq!(query_param(Some("a=1&b=2&a=3"), "a").as_deref(), Some("1"));
        assert_eq!(query_param(Some("flag&b=2"), "flag").as_deref(), Some(""));
        assert_eq!(query_param(Some("ab=1"), "a"), None);
        assert_eq!(query_param(None, "a"), None);
    }
}

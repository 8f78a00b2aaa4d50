//! Kubernetes name syntax: DNS subdomains (node names) and label keys and values (node
//! selectors), as apimachinery's validation checks them, and relative paths inside the
//! node's image directory. The CRD says the same with OpenAPI `pattern`s (and one CEL rule
//! for label keys, which OpenAPI cannot constrain); these functions are their Rust mirror.

/// Longest DNS subdomain (RFC 1123).
pub const DNS_SUBDOMAIN_MAX: usize = 253;
/// Longest label value, and the name part of a label key.
pub const LABEL_NAME_MAX: usize = 63;

/// OpenAPI `pattern` of a DNS subdomain (`spec.nodeName`, Secret names; the schema bounds
/// the length to 253).
pub const DNS_SUBDOMAIN_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// CEL rule of `spec.nodeSelector`'s keys: an optional DNS-subdomain prefix and '/', then a
/// name of at most 63 characters. CEL because OpenAPI has no way to constrain map keys.
pub const NODE_SELECTOR_KEYS_RULE: &str = "self.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))";
/// OpenAPI `pattern` of `spec.nodeSelector`'s values (empty allowed; the schema bounds
/// them to 63).
pub const LABEL_VALUE_PATTERN: &str = "^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$";
/// OpenAPI `pattern` of a path inside the node's image directory (`spec.boot.kernel`,
/// `spec.boot.initrd`, `spec.disks[].image`): not starting with '/' and without '..'
/// anywhere. RE2 has no look-ahead, so it says "every '.' is followed by something other
/// than '.', or ends the string", and the first character is not '/'.
pub const RELATIVE_PATH_PATTERN: &str = r"^(?:(?:[^/.]|\.[^.])(?:[^.]|\.[^.])*)?\.?$";

/// The rule [`RELATIVE_PATH_PATTERN`] encodes: relative, and no '..' in it.
pub fn is_relative_path(s: &str) -> bool {
    !s.starts_with('/') && !s.contains("..")
}

fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    !b.is_empty() && b.iter().all(inner) && b[0] != b'-' && b[b.len() - 1] != b'-'
}

/// A DNS subdomain: dot-separated lowercase labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= DNS_SUBDOMAIN_MAX && s.split('.').all(dns_label)
}

/// A label name (and value, when not empty): at most 63 of letters, digits, '-', '_', '.',
/// starting and ending with a letter or digit.
fn label_name(s: &str) -> bool {
    let b = s.as_bytes();
    let inner = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.');
    !b.is_empty()
        && b.len() <= LABEL_NAME_MAX
        && b.iter().all(inner)
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain.
pub fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && label_name(name),
        None => label_name(s),
    }
}

/// A label value: empty, or a label name.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || label_name(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn re(p: &str) -> regex::Regex {
        regex::Regex::new(p).expect("the CRD's patterns are valid regular expressions")
    }

    #[test]
    fn patterns_say_what_the_functions_say() {
        let (sub, val) = (re(DNS_SUBDOMAIN_PATTERN), re(LABEL_VALUE_PATTERN));
        for s in [
            "node-a",
            "n1",
            "worker-1.example.com",
            "",
            "Not_A/Node",
            "Node-A",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "eu-west-1",
            "A.b_c",
            "-x",
            "x-",
            "has space",
            "a/b",
        ] {
            // The schema bounds the length; the pattern says the rest.
            assert_eq!(sub.is_match(s), is_dns_subdomain(s), "subdomain {s:?}");
            assert_eq!(val.is_match(s), is_label_value(s), "label value {s:?}");
        }
    }

    proptest! {
        #[test]
        fn relative_path_pattern_is_the_rule(s in "[a./\\n-]{0,12}") {
            prop_assert_eq!(re(RELATIVE_PATH_PATTERN).is_match(&s), is_relative_path(&s), "{:?}", s);
        }

        #[test]
        fn dns_patterns_are_the_functions(s in "[a-zA-Z0-9._/ -]{0,12}") {
            prop_assert_eq!(re(DNS_SUBDOMAIN_PATTERN).is_match(&s), is_dns_subdomain(&s), "{:?}", s);
            prop_assert_eq!(re(LABEL_VALUE_PATTERN).is_match(&s), is_label_value(&s), "{:?}", s);
        }
    }

    #[test]
    fn node_names() {
        for ok in ["node-a", "n1", "worker-1.example.com", &"a".repeat(63)] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "Not_A/Node",
            "Node-A",
            "-a",
            "a-",
            "a..b",
            ".a",
            &"a.".repeat(127),
        ] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        for ok in ["zone", "topology.kubernetes.io/zone", "a_b.c-d", "x/Y"] {
            assert!(is_label_key(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "/zone",
            "Bad Prefix/x",
            "a/",
            "-a",
            "a/b/c",
            long.as_str(),
        ] {
            assert!(!is_label_key(bad), "{bad}");
        }
        for ok in ["", "eu-west-1", "A.b_c"] {
            assert!(is_label_value(ok), "{ok}");
        }
        for bad in ["-x", "x-", "has space", long.as_str(), "a/b"] {
            assert!(!is_label_value(bad), "{bad}");
        }
    }
}

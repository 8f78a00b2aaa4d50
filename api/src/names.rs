//! Kubernetes name syntax: DNS subdomains (node names) and label keys and values (node
//! selectors), as apimachinery's validation checks them. The CRD's CEL rules say the same
//! with regular expressions; these are their Rust mirror.

/// Longest DNS subdomain (RFC 1123).
pub const DNS_SUBDOMAIN_MAX: usize = 253;
/// Longest label value, and the name part of a label key.
pub const LABEL_NAME_MAX: usize = 63;

/// CEL rule of `spec.nodeName` (the schema bounds its length to 253).
pub const NODE_NAME_RULE: &str =
    "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";
/// CEL rule of `spec.nodeSelector`'s keys: an optional DNS-subdomain prefix and '/', then a
/// name of at most 63 characters.
pub const NODE_SELECTOR_KEYS_RULE: &str = "self.all(k, size(k) <= 317 && k.matches('^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$'))";
/// CEL rule of `spec.nodeSelector`'s values (empty allowed; the schema bounds them to 63).
pub const NODE_SELECTOR_VALUES_RULE: &str =
    "self.all(k, self[k].matches('^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$'))";

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

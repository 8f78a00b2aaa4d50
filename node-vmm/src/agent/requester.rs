//! Who asked for a resize: the field manager that last wrote `spec.cpus`, read from the
//! object's `managedFields`, so the `Resized` Event can say "by kube-controller-manager
//! through /scale" (an HPA or KEDA) or "by kubectl-patch" (a person).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The requester of the current `spec.cpus`: the manager of the newest `managedFields`
/// entry that owns the field, with " through /scale" when it wrote through the scale
/// subresource. `None` when no entry owns it (an API server that tracks no managed fields).
pub fn cpus_requester(meta: &ObjectMeta) -> Option<String> {
    let entries = meta.managed_fields.as_ref()?;
    let owner = entries
        .iter()
        .filter(|e| {
            e.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.pointer("/f:spec/f:cpus").is_some())
        })
        // Entries of one update share its second; the last of equals wins (the API server
        // appends the entry of the newest update).
        .max_by(|a, b| {
            a.time
                .as_ref()
                .map(|t| t.0)
                .cmp(&b.time.as_ref().map(|t| t.0))
        })?;
    let manager = owner.manager.as_deref().filter(|m| !m.is_empty())?;
    Some(match owner.subresource.as_deref() {
        Some("scale") => format!("{manager} through /scale"),
        _ => manager.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(yaml: &str) -> ObjectMeta {
        serde_yaml::from_str(yaml).expect("test metadata parses")
    }

    #[test]
    fn the_newest_owner_of_spec_cpus_wins() {
        let m = meta(
            r#"
managedFields:
- manager: kubectl-client-side-apply
  operation: Update
  time: "2026-12-04T10:00:00Z"
  fieldsType: FieldsV1
  fieldsV1: {"f:spec": {"f:cpus": {}, "f:maxCpus": {}}}
- manager: corescale-operator
  operation: Apply
  time: "2026-12-04T10:00:05Z"
  fieldsType: FieldsV1
  fieldsV1: {"f:spec": {"f:topology": {}}}
- manager: kube-controller-manager
  operation: Update
  subresource: scale
  time: "2026-12-04T10:01:00Z"
  fieldsType: FieldsV1
  fieldsV1: {"f:spec": {"f:cpus": {}}}
- manager: node-vmm
  operation: Apply
  subresource: status
  time: "2026-12-04T10:02:00Z"
  fieldsType: FieldsV1
  fieldsV1: {"f:status": {"f:cpus": {}}}
"#,
        );
        assert_eq!(
            cpus_requester(&m).as_deref(),
            Some("kube-controller-manager through /scale")
        );
    }

    #[test]
    fn a_patch_names_its_manager_and_no_owner_gives_none() {
        let m = meta(
            r#"
managedFields:
- manager: kube-controller-manager
  operation: Update
  subresource: scale
  time: "2026-12-04T10:01:00Z"
  fieldsType: FieldsV1
  fieldsV1: {"f:spec": {"f:cpus": {}}}
- manager: kubectl-patch
  operation: Update
  time: "2026-12-04T10:03:00Z"
  fieldsType: FieldsV1
  fieldsV1: {"f:spec": {"f:cpus": {}}}
"#,
        );
        assert_eq!(cpus_requester(&m).as_deref(), Some("kubectl-patch"));
        assert_eq!(cpus_requester(&meta("name: x")), None);
        let status_only = meta(
            r#"
managedFields:
- manager: node-vmm
  operation: Apply
  subresource: status
  fieldsType: FieldsV1
  fieldsV1: {"f:status": {"f:cpus": {}}}
"#,
        );
        assert_eq!(cpus_requester(&status_only), None);
    }
}

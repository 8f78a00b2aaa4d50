//! Prints the `VirtualMachine` CRD as YAML; `make generate` writes it into `crds/` and the
//! chart, and CI fails when the committed copies drift from it.
fn main() {
    print!("{}", corescale_api::crd_yaml());
}

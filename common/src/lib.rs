//! Runtime pieces shared by the operator and the node agent.

pub mod events;
pub mod http;
pub mod lease;
pub mod logging;

/// `corescale_build_info{component, version} 1`, for a binary's registry.
pub fn build_info(component: &str) -> prometheus::Result<prometheus::IntGaugeVec> {
    let g = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "corescale_build_info",
            "Build of the running binary; always 1.",
        ),
        &["component", "version"],
    )?;
    g.with_label_values(&[component, env!("CARGO_PKG_VERSION")])
        .set(1);
    Ok(g)
}

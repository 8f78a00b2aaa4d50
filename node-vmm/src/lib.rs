//! corescale node-vmm

//! corescale e2e harness

//! corescale api

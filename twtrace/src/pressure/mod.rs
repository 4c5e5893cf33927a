//! Port pressure: which destinations are closest to running out of local ports, why, and
//! what to change. The aggregator turns events (live or recorded) and kernel snapshots
//! into per-destination views; `top` and `report` show them.

pub mod advice;
pub mod aggregator;
pub mod kernel_view;
pub mod report;
pub mod screen;
pub mod view;

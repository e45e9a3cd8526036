//! Chained ("meta") plugins: they change an attachment a main plugin made,
//! reading it from prevResult and passing the result on.
pub mod bandwidth;
pub mod common;
pub mod firewall;
pub mod portmap;
pub mod tuning;

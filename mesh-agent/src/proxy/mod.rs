//! The node agent's proxy: connections captured leaving local pods (outbound), HBONE
//! between node agents (both ends), and delivery under the destination's policies
//! (inbound).

pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod socket;

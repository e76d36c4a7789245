//! The configuration loader: YAML text → typed objects with diagnostics → validation
//! across objects → the mesh state an agent works from and the verdicts it hands the
//! kernel. Every input must come back as diagnostics, never as a panic or a hang.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mesh_agent::{config::load_str, model::MeshState, policy::kernel::kernel_verdicts};

fuzz_target!(|data: &[u8]| {
    // `load_path` reads files as UTF-8 and refuses what is not.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = load_str(Path::new("fuzz.yaml"), text);
    for diagnostic in &config.diagnostics {
        let _ = diagnostic.to_string();
    }
    // The agent builds the state from whatever loaded, errors or not (the first
    // configuration applies what is valid in it).
    let state = MeshState::build("node-a", &config);
    let _ = kernel_verdicts(&state, "cluster.local", true);
});

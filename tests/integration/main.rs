//! The integration tests, one crate (one build, one link of the AWS SDK), a module per area. Most run
//! against the AWS emulator (tests/emulator.py, started by each test on a free port); `lambda_runtime`
//! runs the real Lambda binary through a local Runtime API; `recorded_aws` replays recorded responses for
//! what no emulator reproduces; `fuzz` and `security` need no AWS. nextest runs each test in a process
//! of its own.

mod common;

mod check_moto;
mod cli;
mod deputy_moto;
mod emulator_fidelity;
mod encrypted_moto;
mod event_pattern;
mod fanout_moto;
mod faults_moto;
mod fuzz;
mod handler_moto;
mod lambda_runtime;
mod recorded_aws;
mod regions_moto;
mod security;
mod sweep_moto;

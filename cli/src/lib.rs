//! The `apiary` command line, as a library so that the integration tests reuse its pieces:
//! the private `nats-server` launcher ([`broker`]), the local stack of `apiary dev` ([`dev`]),
//! the benchmarks of `apiary bench` ([`bench`]) and the tables it prints ([`output`]).

pub mod app;
pub mod bench;
pub mod bench_app;
pub mod broker;
pub mod commands;
pub mod context;
pub mod dev;
pub mod map;
pub mod modules;
pub mod output;
pub mod tasks;

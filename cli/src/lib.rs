//! The `apiary` command line, as a library so that the integration tests reuse its pieces:
//! the local stack of `apiary dev` ([`dev`]), the commands ([`commands`], [`tasks`], [`app`],
//! [`modules`], [`map`]), the benchmarks of `apiary bench` ([`bench`], [`bench_app`]) and
//! the tables it prints ([`output`]). The private `nats-server` launcher is its own crate,
//! `apiary-broker`, which the tests use without the CLI.

pub mod app;
pub mod bench;
pub mod bench_app;
pub mod bench_hops;
pub mod bench_module;
pub mod bench_placement;
pub mod bench_record;
pub mod commands;
pub mod context;
pub mod dev;
pub mod map;
pub mod modules;
pub mod output;
pub mod tasks;

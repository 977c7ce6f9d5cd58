//! The one integration-test binary. Every test starts its own real `nats-server` (see the
//! harness) and runs schedulers and agents in-process.

mod accounting;
mod app_store;
mod cli;
mod cli_binary;
mod grants;
mod host_api;
mod hostile;
mod identity;
mod lifecycle;
mod messaging;
mod nodes;
mod outbox;
mod precompiled;
mod priorities;
mod recovery;
mod restarts;
mod sdk;
mod task_states;
mod tasks;
mod wire;

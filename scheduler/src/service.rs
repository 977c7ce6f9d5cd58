//! The replica's micro service endpoints, wired to their handlers: `register` and
//! `heartbeat` for agents ([`crate::registration`]), the node table for everyone, the node
//! commands and cluster settings for operators ([`crate::admin`]), and join tokens
//! ([`crate::tokens`]). Requests decode from either encoding and are answered in kind
//! ([`rpc::serve`]).

use std::future::Future;
use std::sync::Arc;

use apiary_proto::admin::{TokenCreateRequest, TokenList, TokenListRequest, TokenRevokeRequest};
use apiary_proto::message::{
    ErrorBody, ErrorCode, NODES_PAGE_DEFAULT, NODES_PAGE_MAX, NodesListReply, NodesListRequest,
    Reply,
};
use apiary_proto::rpc::{self, Inbound};
use apiary_proto::subject::{
    self, DlqCommand, NodeVerb, NodesCommand, TasksCommand, TokensCommand,
};
use apiary_proto::{CodecError, NodeId, now_ms};
use async_nats::service::Service;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{SYNC_WAIT, Shared, admin, dlq, registration, tasks, tokens};

/// Adds the endpoints to `service` and answers them on `tasks` until `stop`.
pub(crate) async fn start(
    service: &Service,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let endpoints = Endpoints {
        service,
        shared,
        stop,
    };
    endpoints
        .add_inbound(
            tasks,
            "register",
            subject::all_nodes(NodeVerb::Register),
            registration::register,
        )
        .await?;
    endpoints
        .add_inbound(
            tasks,
            "heartbeat",
            subject::all_nodes(NodeVerb::Heartbeat),
            registration::heartbeat,
        )
        .await?;
    endpoints
        .add(tasks, "nodes-list", subject::nodes_list(), list_nodes)
        .await?;
    for command in NodesCommand::ALL {
        let name = format!("nodes-{}", command.token());
        let subject = subject::nodes_command(command);
        match command {
            NodesCommand::Show => endpoints.add(tasks, name, subject, admin::show).await?,
            NodesCommand::Cordon => endpoints.add(tasks, name, subject, admin::cordon).await?,
            NodesCommand::Uncordon => endpoints.add(tasks, name, subject, admin::uncordon).await?,
            NodesCommand::Drain => endpoints.add(tasks, name, subject, admin::drain).await?,
            NodesCommand::Label => endpoints.add(tasks, name, subject, admin::label).await?,
            NodesCommand::Role => endpoints.add(tasks, name, subject, admin::role).await?,
            NodesCommand::Approve => endpoints.add(tasks, name, subject, admin::approve).await?,
            NodesCommand::Remove => endpoints.add(tasks, name, subject, admin::remove).await?,
        }
    }
    for command in TokensCommand::ALL {
        let name = format!("tokens-{}", command.token());
        let subject = subject::tokens_command(command);
        match command {
            TokensCommand::Create => endpoints.add(tasks, name, subject, create_token).await?,
            TokensCommand::List => endpoints.add(tasks, name, subject, list_tokens).await?,
            TokensCommand::Revoke => endpoints.add(tasks, name, subject, revoke_token).await?,
        }
    }
    for command in TasksCommand::ALL {
        let name = format!("tasks-{}", command.token());
        let subject = subject::tasks_command(command);
        match command {
            TasksCommand::Status => endpoints.add(tasks, name, subject, tasks::status).await?,
            TasksCommand::Result => endpoints.add(tasks, name, subject, tasks::result).await?,
            TasksCommand::List => endpoints.add(tasks, name, subject, tasks::list).await?,
            TasksCommand::Cancel => endpoints.add(tasks, name, subject, tasks::cancel).await?,
        }
    }
    for command in DlqCommand::ALL {
        let name = format!("dlq-{}", command.token());
        let subject = subject::dlq_command(command);
        match command {
            DlqCommand::List => endpoints.add(tasks, name, subject, dlq::list).await?,
            DlqCommand::Show => endpoints.add(tasks, name, subject, dlq::show).await?,
            DlqCommand::Requeue => endpoints.add(tasks, name, subject, dlq::requeue).await?,
        }
    }
    endpoints
        .add(
            tasks,
            "cluster-settings",
            subject::cluster_settings(),
            admin::cluster_settings,
        )
        .await?;
    Ok(())
}

/// What adding an endpoint needs.
struct Endpoints<'a> {
    service: &'a Service,
    shared: &'a Arc<Shared>,
    stop: &'a CancellationToken,
}

impl Endpoints<'_> {
    async fn endpoint(
        &self,
        name: impl Into<String>,
        subject: subject::Subject,
    ) -> anyhow::Result<async_nats::service::endpoint::Endpoint> {
        let name = name.into();
        self.service
            .endpoint_builder()
            .name(name.clone())
            .add(String::from(subject))
            .await
            .map_err(|err| anyhow::anyhow!("failed to add the {name} endpoint: {err}"))
    }

    /// An endpoint whose handler sees only the decoded body.
    async fn add<Req, Resp, Fut>(
        &self,
        tasks: &mut JoinSet<anyhow::Result<()>>,
        name: impl Into<String>,
        subject: subject::Subject,
        handler: fn(Arc<Shared>, Req) -> Fut,
    ) -> anyhow::Result<()>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        Fut: Future<Output = Reply<Resp>> + Send + 'static,
    {
        let endpoint = self.endpoint(name, subject).await?;
        let shared = self.shared.clone();
        let serving = rpc::serve(self.shared.client.clone(), endpoint, move |_, request| {
            handler(shared.clone(), request)
        });
        tasks.spawn(until_stopped(self.stop.clone(), serving).in_current_span());
        Ok(())
    }

    /// An endpoint whose handler sees the whole request (headers, exact body) and may
    /// leave it unanswered.
    async fn add_inbound<Req, Resp, Fut>(
        &self,
        tasks: &mut JoinSet<anyhow::Result<()>>,
        name: impl Into<String>,
        subject: subject::Subject,
        handler: fn(Arc<Shared>, Inbound, Result<Req, CodecError>) -> Fut,
    ) -> anyhow::Result<()>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        Fut: Future<Output = Option<Reply<Resp>>> + Send + 'static,
    {
        let endpoint = self.endpoint(name, subject).await?;
        let shared = self.shared.clone();
        let serving = rpc::serve_inbound(
            self.shared.client.clone(),
            endpoint,
            move |inbound, request| handler(shared.clone(), inbound, request),
        );
        tasks.spawn(until_stopped(self.stop.clone(), serving).in_current_span());
        Ok(())
    }
}

/// Serves until `stop`; an endpoint that closes on its own is a failure.
async fn until_stopped(
    stop: CancellationToken,
    serving: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::select! {
        _ = stop.cancelled() => Ok(()),
        _ = serving => anyhow::bail!("a service endpoint closed"),
    }
}

/// The node named in the subject must be the node the body speaks for: server permissions
/// fence nodes by subject, so the subject is the identity that counts.
pub(crate) fn check_subject(
    subject_node: Option<NodeId>,
    body_node: &NodeId,
) -> Result<(), ErrorBody> {
    match subject_node {
        Some(node) if &node == body_node => Ok(()),
        Some(node) => Err(ErrorBody::new(
            ErrorCode::Forbidden,
            format!("the body speaks for node {body_node} but was sent on node {node}'s subject"),
        )),
        None => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "the subject names no node",
        )),
    }
}

/// One page of the node list (`NodesListRequest::after`, `limit`); a reply the server would
/// not carry becomes a `too_large` refusal (`apiary_proto::rpc`), never silence.
async fn list_nodes(shared: Arc<Shared>, request: NodesListRequest) -> Reply<NodesListReply> {
    let limit = request.limit.unwrap_or(NODES_PAGE_DEFAULT);
    if limit == 0 || limit > NODES_PAGE_MAX {
        return Reply::Error(ErrorBody::new(
            ErrorCode::BadRequest,
            format!("limit must be 1 to {NODES_PAGE_MAX}, not {limit}"),
        ));
    }
    shared.wait_synced(SYNC_WAIT).await;
    let (nodes, next) = shared.view().summaries_page(
        now_ms(),
        request.status,
        request.after.as_ref(),
        limit as usize,
    );
    Reply::Ok(NodesListReply { nodes, next })
}

async fn create_token(
    shared: Arc<Shared>,
    request: TokenCreateRequest,
) -> Reply<apiary_proto::admin::TokenCreated> {
    tokens::create(&shared.cluster, &request, now_ms())
        .await
        .into()
}

async fn list_tokens(shared: Arc<Shared>, _: TokenListRequest) -> Reply<TokenList> {
    tokens::list(&shared.cluster)
        .await
        .map(|tokens| TokenList { tokens })
        .into()
}

async fn revoke_token(
    shared: Arc<Shared>,
    request: TokenRevokeRequest,
) -> Reply<apiary_proto::admin::TokenInfo> {
    tokens::revoke(&shared.cluster, &request.id, now_ms())
        .await
        .into()
}

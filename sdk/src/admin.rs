//! Cluster administration through the scheduler's request subjects: node lifecycle
//! (show, cordon, drain, labels, roles, approval, removal), join tokens and cluster settings.
//! A refusal (no such node, a bad label) is a [`RequestError`] of kind
//! [`RequestErrorKind::Refused`](crate::RequestErrorKind::Refused), with the scheduler's code
//! and message.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use apiary_proto::NodeId;
use apiary_proto::admin::{
    Approval, ClusterSettings, DrainRequest, LabelRequest, NodeRef, Removed, RoleRequest,
    SettingsRequest, TokenCreateRequest, TokenCreated, TokenInfo, TokenList, TokenListRequest,
    TokenRevokeRequest,
};
use apiary_proto::message::NodeSummary;
use apiary_proto::rpc;
use apiary_proto::subject::{self, NodesCommand, TokensCommand};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Client, REQUEST_TIMEOUT, RequestError};

/// A join token to create.
#[derive(Clone, Debug, Default)]
pub struct NewToken {
    /// What the token is for, as `tokens ls` shows it.
    pub description: String,
    /// How long it admits new nodes; forever when `None`.
    pub ttl: Option<Duration>,
    /// How many new nodes it admits; unlimited when `None`.
    pub uses: Option<u32>,
}

impl Client {
    pub(crate) async fn ask<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: subject::Subject,
        request: &Req,
    ) -> Result<Resp, RequestError> {
        Ok(rpc::request(self.nats(), subject, request, REQUEST_TIMEOUT).await?)
    }

    async fn node_command(
        &self,
        command: NodesCommand,
        node: &NodeId,
    ) -> Result<NodeSummary, RequestError> {
        self.ask(
            subject::nodes_command(command),
            &NodeRef {
                node_id: node.clone(),
            },
        )
        .await
    }

    /// One node's full record: inventory, live metrics, and what the operator set.
    pub async fn node(&self, node: &NodeId) -> Result<NodeSummary, RequestError> {
        self.node_command(NodesCommand::Show, node).await
    }

    /// Stops placing new work on the node; what it holds stays.
    pub async fn cordon(&self, node: &NodeId) -> Result<NodeSummary, RequestError> {
        self.node_command(NodesCommand::Cordon, node).await
    }

    /// Lets the node take new work again (after a cordon or a drain).
    pub async fn uncordon(&self, node: &NodeId) -> Result<NodeSummary, RequestError> {
        self.node_command(NodesCommand::Uncordon, node).await
    }

    /// Stops placing new work on the node, moves what is queued there elsewhere, and lets
    /// running tasks finish for up to `deadline` (ten minutes when `None`); those still
    /// running then are handed back and placed elsewhere.
    pub async fn drain(
        &self,
        node: &NodeId,
        deadline: Option<Duration>,
    ) -> Result<NodeSummary, RequestError> {
        let within_ms = deadline.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.ask(
            subject::nodes_command(NodesCommand::Drain),
            &DrainRequest {
                node_id: node.clone(),
                within_ms,
            },
        )
        .await
    }

    /// Sets labels (they win over the agent's own) and removes others.
    pub async fn label(
        &self,
        node: &NodeId,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<NodeSummary, RequestError> {
        self.ask(
            subject::nodes_command(NodesCommand::Label),
            &LabelRequest {
                node_id: node.clone(),
                set,
                remove,
            },
        )
        .await
    }

    /// Replaces the node's roles.
    pub async fn set_roles(
        &self,
        node: &NodeId,
        roles: BTreeSet<String>,
    ) -> Result<NodeSummary, RequestError> {
        self.ask(
            subject::nodes_command(NodesCommand::Role),
            &RoleRequest {
                node_id: node.clone(),
                roles,
            },
        )
        .await
    }

    /// Approves a node that waits for approval.
    pub async fn approve(&self, node: &NodeId) -> Result<NodeSummary, RequestError> {
        self.node_command(NodesCommand::Approve, node).await
    }

    /// Forgets the node and its key binding; a running agent of it is told to leave.
    pub async fn remove_node(&self, node: &NodeId) -> Result<Removed, RequestError> {
        self.ask(
            subject::nodes_command(NodesCommand::Remove),
            &NodeRef {
                node_id: node.clone(),
            },
        )
        .await
    }

    /// Creates a join token. The returned [`TokenCreated::token`] is the only copy of its
    /// secret.
    pub async fn create_token(&self, token: NewToken) -> Result<TokenCreated, RequestError> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.ask(
            subject::tokens_command(TokensCommand::Create),
            &TokenCreateRequest {
                description: token.description,
                ttl_ms: token.ttl.map(millis),
                max_uses: token.uses,
            },
        )
        .await
    }

    /// Every join token, without secrets.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, RequestError> {
        let list: TokenList = self
            .ask(
                subject::tokens_command(TokensCommand::List),
                &TokenListRequest {},
            )
            .await?;
        Ok(list.tokens)
    }

    /// Revokes a join token: it admits no new node; nodes it admitted keep working.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenInfo, RequestError> {
        self.ask(
            subject::tokens_command(TokensCommand::Revoke),
            &TokenRevokeRequest { id: id.to_owned() },
        )
        .await
    }

    /// The cluster's settings.
    pub async fn cluster_settings(&self) -> Result<ClusterSettings, RequestError> {
        self.ask(subject::cluster_settings(), &SettingsRequest::default())
            .await
    }

    /// Sets whether new nodes wait for approval.
    pub async fn set_approval(&self, approval: Approval) -> Result<ClusterSettings, RequestError> {
        self.ask(
            subject::cluster_settings(),
            &SettingsRequest {
                approval: Some(approval),
            },
        )
        .await
    }
}

//! `contextos memory list|forget`: a tenant's memory items in its store — listed by scope, type
//! and words, newest first, and forgotten one by one or a whole scope at once (a subject's
//! memory, when they ask for it).

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use contextos_runner::{
    memory::{
        ItemId, ItemScope, MAX_RECALL_ITEMS, RecallQuery,
        bank::MemoryBank,
        remote::{Listed, RemoteMemory, parse_type, type_name},
    },
    records::{AnyStore, Hash},
};

use super::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum MemoryCommand {
    /// List a scope's items, newest first (consented or not: what an agent could be offered
    /// is decided at recall).
    List {
        /// agent:<name>, subject:<handle> or tenant.
        #[arg(long)]
        scope: String,
        /// Only items of this type: fact, preference, procedure or episode.
        #[arg(long = "type")]
        memory_type: Option<String>,
        /// Only items holding every one of these words.
        #[arg(long, default_value = "")]
        query: String,
        /// At most this many items (1–100).
        #[arg(long, default_value_t = 20)]
        max: usize,
    },
    /// Forget one item (by the id `list` prints) or, with --scope, every item of a scope.
    Forget {
        /// The item's id.
        #[arg(required_unless_present = "scope", conflicts_with = "scope")]
        id: Option<String>,
        /// Every item of this scope: agent:<name>, subject:<handle> or tenant.
        #[arg(long)]
        scope: Option<String>,
    },
}

pub async fn run(global: &GlobalArgs, command: MemoryCommand) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_records(&tenant).await?;
    match command {
        MemoryCommand::List {
            scope,
            memory_type,
            query,
            max,
        } => {
            let scope: ItemScope = scope.parse().context("--scope")?;
            let memory_type = memory_type
                .as_deref()
                .map(parse_type)
                .transpose()
                .context("--type")?;
            if !(1..=MAX_RECALL_ITEMS).contains(&max) {
                anyhow::bail!("--max {max}: list 1 to {MAX_RECALL_ITEMS} items at a time");
            }
            let listed = match &store {
                AnyStore::Gateway(remote) => {
                    RemoteMemory(remote)
                        .list(&scope, memory_type, &query, max)
                        .await?
                }
                local => {
                    let q = RecallQuery {
                        scope: scope.clone(),
                        memory_type,
                        text: query,
                        max_items: max,
                        purpose: None,
                    };
                    MemoryBank::new(local, &tenant)
                        .recall(&q, |_| Ok(()))
                        .await?
                        .offered
                        .into_iter()
                        .map(|(id, item)| Listed { id, item })
                        .collect()
                }
            };
            if listed.is_empty() {
                println!("no items in scope {scope} of tenant {tenant}");
            }
            for Listed { id, item } in listed {
                let categories: Vec<String> = item.categories.iter().map(ToString::to_string).collect();
                println!(
                    "{id}  {:<10} run {} at {} ms{}\n    {}",
                    type_name(item.memory_type),
                    item.provenance.run_id,
                    item.provenance.at_ms,
                    if categories.is_empty() {
                        String::new()
                    } else {
                        format!("  personal data: {}", categories.join(", "))
                    },
                    // Printed escaped: an item's text cannot forge the lines after it.
                    item.text.escape_debug()
                );
            }
        }
        MemoryCommand::Forget { id, scope } => match (id, scope) {
            (Some(id), _) => {
                let id = Hash::parse(&id).map(ItemId).with_context(|| {
                    format!("{id:?} is no item id (64 hex digits, as `memory list` prints)")
                })?;
                let forgotten = match &store {
                    AnyStore::Gateway(remote) => RemoteMemory(remote).forget(&id).await?,
                    local => MemoryBank::new(local, &tenant).forget(&id).await?,
                };
                if forgotten {
                    println!("forgotten: {id}");
                } else {
                    anyhow::bail!("tenant {tenant} keeps no item {id}");
                }
            }
            (None, Some(scope)) => {
                let scope: ItemScope = scope.parse().context("--scope")?;
                let forgotten = match &store {
                    AnyStore::Gateway(remote) => RemoteMemory(remote).forget_scope(&scope).await?,
                    local => MemoryBank::new(local, &tenant).forget_scope(&scope).await?,
                };
                println!("forgotten: {forgotten} items of scope {scope}");
            }
            (None, None) => anyhow::bail!("name an item id or --scope"),
        },
    }
    Ok(ExitCode::SUCCESS)
}

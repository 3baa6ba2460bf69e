//! `contextos subject erase|show|rotate-keys`: a person's data in the identity vault. Erasing
//! a subject destroys their data key: what every run about them recorded, and their memory,
//! becomes unreadable everywhere — the store and every copy of it — while every record chain
//! still verifies. Locally against the store (its key rings beside the user's configuration),
//! or through the gateway service, which holds the cluster's.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Subcommand;
use contextos_runner::{
    consent::SubjectHandle,
    records::{AnyStore, recorder::now_ms},
    vault::{
        Erased, Rotation, Vault,
        remote::{SubjectState, SubjectsApi},
    },
};

use super::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum SubjectCommand {
    /// Erase a person: destroy their data key, forget their memory and held candidates, and
    /// rotate the tenant's key-encryption key so copies of the store taken earlier cannot be
    /// opened either. Records keep verifying; what they said about the person reads
    /// "[erased]". Nothing is kept about the handle again. Cannot be undone.
    Erase {
        /// The subject's pseudonymous handle.
        subject: String,
        /// Confirms that the erasure cannot be undone.
        #[arg(long)]
        yes: bool,
        /// Who erases (a local store only: the gateway service takes who you are from your
        /// token); default: the local user.
        #[arg(long)]
        by: Option<String>,
    },
    /// Whether anything is kept about a subject, or they were erased (when, by whom).
    Show {
        /// The subject's pseudonymous handle.
        subject: String,
    },
    /// Rotate the tenant's key-encryption key: every data key is wrapped anew and the old key
    /// destroyed (an erasure does this itself).
    RotateKeys,
}

pub async fn run(global: &GlobalArgs, command: SubjectCommand) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_records(&tenant).await?;
    match command {
        SubjectCommand::Erase { subject, yes, by } => {
            let subject = SubjectHandle::new(&subject).context("subject")?;
            if !yes {
                bail!(
                    "erasing {subject} cannot be undone: what every run about them recorded becomes unreadable; run again with --yes"
                );
            }
            let erased: Erased = match &store {
                AnyStore::Gateway(remote) => {
                    if by.is_some() {
                        bail!(
                            "--by: the gateway service records who you are from your token; leave --by out"
                        );
                    }
                    SubjectsApi(remote).erase(&subject).await?
                }
                local => {
                    let by = by.unwrap_or_else(GlobalArgs::local_user);
                    Vault::new(local, tenant.clone())
                        .erase(&subject, &by, now_ms())
                        .await
                        .with_context(|| format!("erasing {subject} in tenant {tenant}"))?
                }
            };
            print_erased(&erased);
        }
        SubjectCommand::Show { subject } => {
            let subject = SubjectHandle::new(&subject).context("subject")?;
            let state = match &store {
                AnyStore::Gateway(remote) => SubjectsApi(remote).state(&subject).await?,
                local => SubjectState::of(
                    &Vault::new(local, tenant.clone())
                        .key(&subject)
                        .await
                        .with_context(|| format!("reading {subject} in tenant {tenant}"))?,
                ),
            };
            match state {
                SubjectState::Active => println!("{subject}: kept (their data key exists)"),
                SubjectState::Unknown => println!("{subject}: nothing is kept about them"),
                SubjectState::Erased { erasure } => println!(
                    "{subject}: erased at {} by {}",
                    super::format_ms(erasure.erased_at_ms),
                    erasure.by
                ),
            }
        }
        SubjectCommand::RotateKeys => {
            let rotation: Rotation = match &store {
                AnyStore::Gateway(remote) => SubjectsApi(remote).rotate().await?,
                local => Vault::new(local, tenant.clone())
                    .rotate()
                    .await
                    .with_context(|| format!("rotating tenant {tenant}'s key-encryption key"))?,
            };
            println!(
                "rotated: key epoch {}, {} data keys wrapped anew",
                rotation.epoch, rotation.rewrapped
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_erased(erased: &Erased) {
    println!(
        "erased: subject {} at {} by {}",
        erased.subject,
        super::format_ms(erased.erasure.erased_at_ms),
        erased.erasure.by
    );
    if !erased.had_key {
        println!("  nothing had been kept about them; the handle is closed");
    }
    println!(
        "  memory items and held candidates forgotten: {}",
        erased.memory_forgotten
    );
    println!(
        "  key-encryption key rotated to epoch {} ({} other data keys wrapped anew): copies of the store taken before now cannot open their data",
        erased.rotation.epoch, erased.rotation.rewrapped
    );
}

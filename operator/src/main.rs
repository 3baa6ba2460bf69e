//! The ContextOS operator binary. Controllers arrive with the operator issue; until then the
//! binary only reports the API it serves.

fn main() -> anyhow::Result<()> {
    for crd in contextos_crds::all_crds() {
        println!("{}", crd.metadata.name.unwrap_or_default());
    }
    Ok(())
}

//! `infinitehip config-check FILE`: parse and validate a policy config,
//! check the files it names (locret weights), and say which method each
//! layer runs and why (`PolicyConfig::resolve_layer`'s rule).

use infinitehip::PolicyConfig;

/// Validate a policy config file and say what each layer runs
///
/// Checks every field (errors give the field's JSON path and the expected
/// value) and the files the config names (locret weights: present and in
/// the model's shape); then prints which method each layer runs and which
/// part of the config decided it (overrides > dense_layers > default).
#[derive(clap::Args, Debug)]
pub struct ConfigCheckArgs {
    /// The policy config (JSON) to check.
    #[arg(value_name = "FILE")]
    pub file: String,
}

pub fn run(a: &ConfigCheckArgs) -> Result<(), String> {
    let path = &a.file;
    let c = PolicyConfig::from_file(path).map_err(|e| e.to_string())?;
    c.check_files().map_err(|e| format!("{e} (in {path})"))?;
    println!("{path}: ok ({} layers)", c.model.n_layers);
    for line in c.describe_layers() {
        println!("  {line}");
    }
    Ok(())
}

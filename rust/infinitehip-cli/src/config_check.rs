//! `infinitehip config-check FILE`: parse and validate a policy config,
//! check the files it names (locret weights), and say which method each
//! layer runs and why (`PolicyConfig::resolve_layer`'s rule).

use infinitehip::PolicyConfig;

pub const HELP: &str = "infinitehip config-check FILE
  Validates a policy config: every field (errors give the field's JSON path
  and the expected value), the files it names (locret weights: present and
  in the model's shape), then prints which method each layer runs and which
  part of the config decided it (overrides > dense_layers > default).";

pub fn run(argv: &[String]) -> Result<(), String> {
    let [path] = argv else {
        return Err(format!("config-check takes one FILE\n{HELP}"));
    };
    let c = PolicyConfig::from_file(path).map_err(|e| e.to_string())?;
    c.check_files().map_err(|e| format!("{e} (in {path})"))?;
    println!("{path}: ok ({} layers)", c.model.n_layers);
    for line in c.describe_layers() {
        println!("  {line}");
    }
    Ok(())
}

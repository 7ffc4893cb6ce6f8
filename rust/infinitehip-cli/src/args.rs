//! Minimal `--flag value` parsing: the CLI has a handful of numeric options,
//! not enough to justify an argument-parser dependency.

use std::collections::HashMap;

pub struct Args {
    flags: HashMap<String, String>,
}

impl Args {
    /// `known`: accepted flag names (without `--`); `switches` take no value.
    pub fn parse(argv: &[String], known: &[&str], switches: &[&str]) -> Result<Args, String> {
        let mut flags = HashMap::new();
        let mut i = 0;
        while i < argv.len() {
            let a = &argv[i];
            let name = a
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument `{a}`"))?;
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (name, None),
            };
            if switches.contains(&name) {
                flags.insert(name.to_string(), "true".to_string());
            } else if known.contains(&name) {
                let v = match inline {
                    Some(v) => v,
                    None => {
                        i += 1;
                        argv.get(i)
                            .cloned()
                            .ok_or_else(|| format!("--{name} needs a value"))?
                    }
                };
                flags.insert(name.to_string(), v);
            } else {
                return Err(format!(
                    "unknown option --{name} (known: {})",
                    [known, switches].concat().join(", ")
                ));
            }
            i += 1;
        }
        Ok(Args { flags })
    }

    pub fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.flags.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: cannot parse `{v}`")),
        }
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        self.flags.get(name).map(|s| s.as_str())
    }

    /// Comma-separated list of numbers.
    pub fn list(&self, name: &str, default: &[usize]) -> Result<Vec<usize>, String> {
        match self.flags.get(name) {
            None => Ok(default.to_vec()),
            Some(v) => v
                .split(',')
                .map(|x| {
                    parse_count(x.trim()).ok_or_else(|| format!("--{name}: cannot parse `{x}`"))
                })
                .collect(),
        }
    }
}

/// `262144`, `256K`, `1M`.
pub fn parse_count(s: &str) -> Option<usize> {
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1024),
        'm' | 'M' => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().map(|n| n * mult)
}

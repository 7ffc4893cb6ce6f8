//! Value parsers shared by the commands' flags (clap `value_parser`s) and
//! the up-front check of output paths.

/// `262144`, `256K`, `1M` (K = 1024).
pub fn parse_count(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1024),
        Some('m' | 'M') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            format!("`{s}` is not a count (a whole number, optionally with K or M: 4096, 32K, 1M)")
        })
}

/// A whole number >= 1 (`256K` style accepted).
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match parse_count(s)? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

/// A fraction in (0, 1].
pub fn parse_fraction(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| *f > 0.0 && *f <= 1.0)
        .ok_or_else(|| format!("`{s}` is not a fraction in (0, 1], e.g. 0.05"))
}

/// A fraction in [0, 1] (0: off).
pub fn parse_fraction_or_zero(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("`{s}` is not a fraction in [0, 1], e.g. 0.25 (0: off)"))
}

/// Fails now, not after an hour of benchmarking, when `path` cannot be
/// written (`flag` names the option in the message). Opens without
/// truncating and removes the file again if this created it, so an existing
/// file is kept until the results replace it.
pub fn check_writable(flag: &str, path: &str) -> Result<(), String> {
    let existed = std::path::Path::new(path).exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| format!("{flag} {path}: cannot write there: {e}"))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_fractions() {
        assert_eq!(parse_count("256K"), Ok(262144));
        assert_eq!(parse_count("1M"), Ok(1 << 20));
        assert_eq!(parse_count(" 77 "), Ok(77));
        assert!(parse_count("4X").unwrap_err().contains("`4X`"));
        assert!(parse_count("").is_err());
        assert!(parse_count("99999999999999999999K").is_err());
        assert!(parse_positive("0").is_err());
        assert_eq!(parse_fraction("0.05"), Ok(0.05));
        assert!(parse_fraction("0").is_err());
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("NaN").is_err());
        assert_eq!(parse_fraction_or_zero("0"), Ok(0.0));
        assert!(parse_fraction_or_zero("-0.1").is_err());
    }

    #[test]
    fn unwritable_path_is_named_and_a_new_file_is_not_left_behind() {
        let e = check_writable("--json", "/nonexistent-dir/x.json").unwrap_err();
        assert!(e.starts_with("--json /nonexistent-dir/x.json"), "{e}");
        let p = std::env::temp_dir().join(format!("ihip-writable-{}", std::process::id()));
        let p = p.to_str().unwrap();
        check_writable("--json", p).unwrap();
        assert!(!std::path::Path::new(p).exists());
    }
}

//! Progress bars for benchmark loops: on stderr only, and only when stderr
//! is a terminal (logs and CI output stay clean).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `len` steps labelled `what`; hidden when stderr is not a TTY.
pub fn steps(len: usize, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("  {msg} [{bar:30}] {pos}/{len} ({elapsed}, eta {eta})")
    {
        b.set_style(style.progress_chars("=> "));
    }
    b.set_message(what.to_string());
    b
}

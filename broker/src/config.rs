//! `vsnd-broker --config FILE`: the same settings as the command line, in a
//! TOML file, for deployments where a policy tool writes one file per VM.
//!
//! * Keys are the long option names without `--` (`initial-streams =
//!   "output"`, `control-allow-uid = [1000]`). Unknown keys are an error, so a
//!   typo never silently leaves the microphone setting at its default.
//! * The `--insecure-*` options, `--seccomp` (its `log` mode turns the
//!   device's system-call filter into a report) and any hidden option exist
//!   on the command line only: a file can neither turn the sandbox off nor
//!   make its filter permissive. (`device-path` names the program the
//!   broker starts as the device: protect a file that sets it like the
//!   broker's own binary.)
//! * An option given on the command line overrides the file's key (a list
//!   such as `--control-allow-uid` replaces the file's list). `--socket` or
//!   `--socket-fd` on the command line overrides both `socket` and
//!   `socket-fd` of the file.
//! * Relative paths in the file are relative to the file's directory.
//! * A file that cannot be read or parsed gives a [`ConfigError`] naming the
//!   file, the line and column, and what is wrong.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};

use crate::cli::{self, BackendKind, Cli};

/// Largest config file read: a real one is a few hundred bytes.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The settings of a config file; `None` is "not in the file".
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    /// `--socket`.
    #[serde(default, deserialize_with = "path")]
    pub socket: Option<PathBuf>,
    /// `--socket-fd`.
    pub socket_fd: Option<i32>,
    /// `--backend`.
    pub backend: Option<BackendKind>,
    /// `--initial-streams` (checked when the file is read).
    #[serde(default, deserialize_with = "streams")]
    pub initial_streams: Option<String>,
    /// `--playback-file`.
    #[serde(default, deserialize_with = "path")]
    pub playback_file: Option<PathBuf>,
    /// `--capture-file`.
    #[serde(default, deserialize_with = "path")]
    pub capture_file: Option<PathBuf>,
    /// `--pipewire-remote`.
    #[serde(default, deserialize_with = "word")]
    pub pipewire_remote: Option<String>,
    /// `--name`.
    #[serde(default, deserialize_with = "word")]
    pub name: Option<String>,
    /// `--alsa-playback-device`.
    #[serde(default, deserialize_with = "word")]
    pub alsa_playback_device: Option<String>,
    /// `--alsa-capture-device`.
    #[serde(default, deserialize_with = "word")]
    pub alsa_capture_device: Option<String>,
    /// `--device-path`.
    #[serde(default, deserialize_with = "path")]
    pub device_path: Option<PathBuf>,
    /// `--control-socket`.
    #[serde(default, deserialize_with = "path")]
    pub control_socket: Option<PathBuf>,
    /// `--control-allow-uid`, as a list.
    pub control_allow_uid: Option<Vec<u32>>,
    /// `--audit-log`.
    #[serde(default, deserialize_with = "path")]
    pub audit_log: Option<PathBuf>,
    /// `--device-user`.
    #[serde(default, deserialize_with = "word")]
    pub device_user: Option<String>,
}

fn path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Err(D::Error::custom("a path must not be empty"));
    }
    Ok(Some(PathBuf::from(s)))
}

fn word<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Err(D::Error::custom("must not be empty"));
    }
    Ok(Some(s))
}

fn streams<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    cli::parse_streams(&s).map_err(|e| D::Error::custom(format!("initial-streams: {e}")))?;
    Ok(Some(s))
}

/// A config file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as given.
    pub path: PathBuf,
    /// 1-based line and column of the problem, when it has a place.
    pub position: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
    /// The offending line of the file, when there is one.
    pub line_text: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config file {}", self.path.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ", line {line}, column {column}")?;
        }
        write!(f, ": {}", self.message)?;
        if let (Some((line, _)), Some(text)) = (self.position, &self.line_text) {
            write!(f, "\n  {line} | {text}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// 1-based (line, column) of byte `offset` in `text`, and that line.
fn locate(text: &str, offset: usize) -> ((usize, usize), String) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(start..).map_or(0, |s| s.chars().count()) + 1;
    let line_text = text
        .get(start..)
        .and_then(|rest| rest.lines().next())
        .unwrap_or("")
        .to_string();
    ((line, column), line_text)
}

/// Parse the text of a config file; `path` only names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str::<FileConfig>(text).map_err(|e| {
        let (position, line_text) = match e.span() {
            Some(span) => {
                let (pos, line) = locate(text, span.start);
                (Some(pos), Some(line))
            }
            None => (None, None),
        };
        ConfigError {
            path: path.to_path_buf(),
            position,
            // The message alone: the place is ours to say.
            message: e.message().trim_end().to_string(),
            line_text,
        }
    })
}

/// Read and parse the config file at `path`.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    use std::io::Read as _;
    let err = |message: String| ConfigError {
        path: path.to_path_buf(),
        position: None,
        message,
        line_text: None,
    };
    // Non-blocking, so that a FIFO at the path is refused instead of
    // blocking the start-up until someone writes to it.
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| err(format!("cannot open it: {e}")))?
    };
    let meta = file
        .metadata()
        .map_err(|e| err(format!("cannot stat it: {e}")))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read it: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(err(format!(
            "larger than {MAX_CONFIG_BYTES} bytes; is this the right file?"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        let (pos, line) = locate(
            &String::from_utf8_lossy(e.as_bytes()),
            e.utf8_error().valid_up_to(),
        );
        ConfigError {
            path: path.to_path_buf(),
            position: Some(pos),
            message: "not UTF-8 text".into(),
            line_text: Some(line),
        }
    })?;
    parse(path, &text)
}

/// Whether the user gave option `id` (a `Cli` field name) on the command
/// line, as opposed to leaving it at its default.
pub fn given_on_command_line(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Fill every setting of `cli` that the command line did not give from
/// `file`. `base` is the directory that relative paths of the file are
/// relative to (the file's own).
pub fn merge(
    cli: &mut Cli,
    matches: &ArgMatches,
    file: FileConfig,
    base: &Path,
) -> Result<(), String> {
    let given = |id: &str| given_on_command_line(matches, id);
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };

    fn set<T>(given: bool, field: &mut T, value: Option<T>) {
        if let (false, Some(v)) = (given, value) {
            *field = v;
        }
    }
    fn set_opt<T>(given: bool, field: &mut Option<T>, value: Option<T>) {
        if let (false, Some(v)) = (given, value) {
            *field = Some(v);
        }
    }

    if !given("socket") && !given("socket_fd") {
        if file.socket.is_some() && file.socket_fd.is_some() {
            return Err("give only one of `socket` and `socket-fd`".into());
        }
        cli.socket = file.socket.map(resolve);
        cli.socket_fd = file.socket_fd;
    }
    set(given("backend"), &mut cli.backend, file.backend);
    set(
        given("initial_streams"),
        &mut cli.initial_streams,
        file.initial_streams,
    );
    set_opt(
        given("playback_file"),
        &mut cli.playback_file,
        file.playback_file.map(resolve),
    );
    set_opt(
        given("capture_file"),
        &mut cli.capture_file,
        file.capture_file.map(resolve),
    );
    set_opt(
        given("pipewire_remote"),
        &mut cli.pipewire_remote,
        file.pipewire_remote,
    );
    set_opt(given("name"), &mut cli.name, file.name);
    set(
        given("alsa_playback_device"),
        &mut cli.alsa_playback_device,
        file.alsa_playback_device,
    );
    set(
        given("alsa_capture_device"),
        &mut cli.alsa_capture_device,
        file.alsa_capture_device,
    );
    set_opt(
        given("device_path"),
        &mut cli.device_path,
        file.device_path.map(resolve),
    );
    set_opt(
        given("control_socket"),
        &mut cli.control_socket,
        file.control_socket.map(resolve),
    );
    set(
        given("control_allow_uid"),
        &mut cli.control_allow_uid,
        file.control_allow_uid,
    );
    set_opt(
        given("audit_log"),
        &mut cli.audit_log,
        file.audit_log.map(resolve),
    );
    set(given("device_user"), &mut cli.device_user, file.device_user);
    Ok(())
}

/// The directory relative paths of the config file at `path` are relative
/// to.
pub fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::SeccompMode;
    use clap::{CommandFactory, FromArgMatches};

    fn cli(args: &[&str]) -> (Cli, ArgMatches) {
        let m = Cli::command()
            .try_get_matches_from(std::iter::once("vsnd-broker").chain(args.iter().copied()))
            .unwrap();
        (Cli::from_arg_matches(&m).unwrap(), m)
    }

    fn merged(args: &[&str], toml: &str) -> Cli {
        let (mut c, m) = cli(args);
        let f = parse(Path::new("t.toml"), toml).unwrap();
        merge(&mut c, &m, f, Path::new("/etc/vsnd")).unwrap();
        c
    }

    const FULL: &str = r#"
socket = "/run/vsnd/vm1.sock"
backend = "file"
initial-streams = "output,input"
playback-file = "played.wav"
capture-file = "/srv/capture.raw"
pipewire-remote = "pipewire-0"
name = "vm1"
alsa-playback-device = "plughw:0,0"
alsa-capture-device = "plughw:1,0"
device-path = "/usr/libexec/vsnd-device"
control-socket = "/run/vsnd/vm1.ctl"
control-allow-uid = [1000, 1001]
audit-log = "/var/log/vsnd/vm1.audit"
device-user = "vsnd-device"
"#;

    #[test]
    fn every_key_of_the_file_is_used() {
        let c = merged(&[], FULL);
        assert_eq!(c.socket.as_deref(), Some(Path::new("/run/vsnd/vm1.sock")));
        assert_eq!(c.socket_fd, None);
        assert_eq!(c.backend, BackendKind::File);
        assert_eq!(c.initial_streams, "output,input");
        // Relative to the file's directory.
        assert_eq!(
            c.playback_file.as_deref(),
            Some(Path::new("/etc/vsnd/played.wav"))
        );
        assert_eq!(
            c.capture_file.as_deref(),
            Some(Path::new("/srv/capture.raw"))
        );
        assert_eq!(c.pipewire_remote.as_deref(), Some("pipewire-0"));
        assert_eq!(c.name.as_deref(), Some("vm1"));
        assert_eq!(c.alsa_playback_device, "plughw:0,0");
        assert_eq!(c.alsa_capture_device, "plughw:1,0");
        assert_eq!(
            c.device_path.as_deref(),
            Some(Path::new("/usr/libexec/vsnd-device"))
        );
        assert_eq!(
            c.control_socket.as_deref(),
            Some(Path::new("/run/vsnd/vm1.ctl"))
        );
        assert_eq!(c.control_allow_uid, vec![1000, 1001]);
        assert_eq!(
            c.audit_log.as_deref(),
            Some(Path::new("/var/log/vsnd/vm1.audit"))
        );
        assert_eq!(c.device_user, "vsnd-device");
        assert_eq!(c.seccomp, SeccompMode::Kill);
        assert!(!c.insecure_no_sandbox);
    }

    /// A FIFO (or anything but a regular file) at the path is refused at
    /// once: opening it for reading must not wait for a writer.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("vsnd-config-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("vm.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = load(&fifo).expect_err("a FIFO is not a config file");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = load(&dir).expect_err("a directory is not a config file");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_empty_file_changes_nothing() {
        let (plain, _) = cli(&["--socket", "/x"]);
        let c = merged(&["--socket", "/x"], "# nothing\n");
        assert_eq!(format!("{c:?}"), format!("{plain:?}"));
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let c = merged(
            &[
                "--backend",
                "null",
                "--streams",
                "none",
                "--control-allow-uid",
                "7",
                "--seccomp",
                "kill",
                "--alsa-capture-device",
                "hw:2",
                "--name",
                "cli",
            ],
            FULL,
        );
        assert_eq!(c.backend, BackendKind::Null);
        assert_eq!(c.initial_streams, "none");
        // A list on the command line replaces the file's.
        assert_eq!(c.control_allow_uid, vec![7]);
        // Given explicitly, even with the default value: still the CLI's.
        assert_eq!(c.seccomp, SeccompMode::Kill);
        assert_eq!(c.alsa_capture_device, "hw:2");
        assert_eq!(c.name.as_deref(), Some("cli"));
        // What the command line did not give still comes from the file.
        assert_eq!(c.device_user, "vsnd-device");
        assert_eq!(c.alsa_playback_device, "plughw:0,0");
    }

    #[test]
    fn a_listener_on_the_command_line_replaces_both_listener_keys() {
        let c = merged(&["--socket-fd", "3"], FULL);
        assert_eq!(c.socket_fd, Some(3));
        assert_eq!(c.socket, None);
        let c = merged(&["--socket", "/cli.sock"], "socket-fd = 3\n");
        assert_eq!(c.socket.as_deref(), Some(Path::new("/cli.sock")));
        assert_eq!(c.socket_fd, None);
        let c = merged(&[], "socket-fd = 5\n");
        assert_eq!(c.socket_fd, Some(5));

        let (mut c, m) = cli(&[]);
        let f = parse(Path::new("t.toml"), "socket = \"/a\"\nsocket-fd = 3\n").unwrap();
        let e = merge(&mut c, &m, f, Path::new("/")).unwrap_err();
        assert!(e.contains("socket-fd"), "{e}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        assert_eq!(
            base_dir(Path::new("/etc/vsnd/vm1.toml")),
            Path::new("/etc/vsnd")
        );
        assert_eq!(base_dir(Path::new("vm1.toml")), Path::new("."));
        let c = merged(&[], "socket = \"vm1.sock\"\ncontrol-socket = \"../ctl\"\n");
        assert_eq!(c.socket.as_deref(), Some(Path::new("/etc/vsnd/vm1.sock")));
        assert_eq!(
            c.control_socket.as_deref(),
            Some(Path::new("/etc/vsnd/../ctl"))
        );
        // A relative path on the command line stays the user's.
        let c = merged(&["--socket", "here.sock"], "socket = \"vm1.sock\"\n");
        assert_eq!(c.socket.as_deref(), Some(Path::new("here.sock")));
    }

    fn error(text: &str) -> ConfigError {
        parse(Path::new("/etc/vsnd/vm1.toml"), text).unwrap_err()
    }

    #[test]
    fn errors_name_the_file_line_and_column_and_what_is_wrong() {
        let cases: &[(&str, (usize, usize), &[&str])] = &[
            (
                "socket = \"/a\"\n\nmicrophone = \"on\"\n",
                (3, 1),
                &["unknown field", "microphone", "initial-streams"],
            ),
            (
                "socket = \"/a\"\nbackend = \"oss\"\n",
                (2, 11),
                &["oss", "null", "pipewire"],
            ),
            (
                "# a comment\ninitial-streams = \"output,mic\"\n",
                (2, 19),
                &["initial-streams", "mic"],
            ),
            (
                "control-socket = \"/c\"\ncontrol-allow-uid = [1000, \"bob\"]\n",
                (2, 28),
                &["bob"],
            ),
            ("control-allow-uid = 1000\n", (1, 21), &["sequence"]),
            ("\n\nsocket = \"/a\n", (3, 13), &["string"]),
            ("socket = \"\"\n", (1, 10), &["empty"]),
            ("seccomp = \"log\"\n", (1, 1), &["unknown field", "seccomp"]),
            (
                "insecure-no-sandbox = true\n",
                (1, 1),
                &["unknown field", "insecure-no-sandbox"],
            ),
            ("socket-fd = \"3\"\n", (1, 13), &["string", "i32"]),
            ("socket = \"/a\"\nsocket = \"/b\"\n", (2, 1), &["duplicate"]),
        ];
        for (text, (line, column), says) in cases {
            let e = error(text);
            assert_eq!(
                e.position,
                Some((*line, *column)),
                "for {text:?}: expected line {line}, column {column}; got {e}"
            );
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!(
                    "config file /etc/vsnd/vm1.toml, line {line}, column {column}: "
                )),
                "for {text:?}: got {shown:?}"
            );
            for s in *says {
                assert!(
                    shown.contains(s),
                    "for {text:?}: expected {s:?} in {shown:?}"
                );
            }
            let quoted = text.lines().nth(line - 1).unwrap();
            assert!(
                shown.ends_with(&format!("\n  {line} | {quoted}")),
                "for {text:?}: expected the line quoted, got {shown:?}"
            );
        }
    }

    #[test]
    fn unreadable_files_are_named() {
        let e = load(Path::new("/nonexistent/vsnd.toml")).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with("config file /nonexistent/vsnd.toml: cannot open it"),
            "{shown}"
        );
    }

    #[test]
    fn locate_counts_characters() {
        assert_eq!(locate("a\nb", 2), ((2, 1), "b".to_string()));
        assert_eq!(locate("é = x", 4), ((1, 4), "é = x".to_string()));
        assert_eq!(locate("", 5), ((1, 1), String::new()));
    }

    /// packaging/vsnd.example.toml: all commented out it changes nothing;
    /// uncommented it names every key once and parses.
    #[test]
    fn the_example_file_has_every_key_and_parses() {
        let example = include_str!("../../packaging/vsnd.example.toml");
        assert_eq!(
            parse(Path::new("vsnd.example.toml"), example).unwrap(),
            FileConfig::default()
        );
        let settings: Vec<&str> = example
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
            .collect();
        let keys: Vec<&str> = settings
            .iter()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .collect();
        let mut want = known_keys();
        want.sort();
        let mut got: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        got.sort();
        assert_eq!(got, want, "keys of the example vs keys of the file format");
        let uncommented = settings.join("\n");
        parse(Path::new("vsnd.example.toml"), &uncommented).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The keys a config file may have (from the error for an unknown one).
    fn known_keys() -> Vec<String> {
        let e = error("no-such-key = 1\n").message;
        let (_, expected) = e.split_once("expected").unwrap();
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// Every option the user can see, except `--insecure-*`, `--seccomp`,
    /// `--config`, help and version, is a key of the file, so the two never
    /// drift.
    #[test]
    fn every_visible_option_is_a_config_key() {
        let keys = known_keys();
        let cmd = Cli::command();
        let mut want = Vec::new();
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if arg.is_hide_set()
                || long.starts_with("insecure")
                || ["seccomp", "config", "help", "version"].contains(&long)
            {
                continue;
            }
            want.push(long.to_string());
            assert!(
                keys.iter().any(|k| k == long),
                "--{long} has no config file key; known keys: {keys:?}"
            );
        }
        assert_eq!(
            keys.len(),
            want.len(),
            "config keys {keys:?} vs options {want:?}"
        );
    }
}

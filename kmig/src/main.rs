//! `mlx5-kmig`: the guest-side migration tool (see the crate docs).
//!
//! ```text
//! mlx5-kmig flags BDF...                 the migration flags of each device
//! mlx5-kmig migrate SRC DST [--seed N] [--piece N] [--dump]
//!     write a pattern into SRC's BAR2; RUNNING_P2P and back; RUNNING -> PRE_COPY
//!     with PRECOPY_INFO, reading its data -> PRE_COPY_P2P -> STOP_COPY, reading the
//!     stream -> STOP; DST: -> RESUMING, write the stream -> STOP -> RUNNING; compare
//!     both BAR2s; SRC -> RUNNING; reset both. --dump prints the stream on the console.
//! mlx5-kmig load DST FILE [--piece N]    DST: -> RESUMING, write FILE -> STOP -> RUNNING
//! ```
//!
//! It prints one `MLX5EMU-KMIG-<WHAT> key=value ...` line per step (the formats are
//! listed in fixtures/qemu/README.md), `MLX5EMU-KMIG-OK` at the end, or
//! `MLX5EMU-KMIG-ERROR msg=...` naming the call, device, state and errno, and exits 1.

use std::process::ExitCode;

use mlx5_kmig::codec;
use mlx5_kmig::vfio::{Container, DataFd, Device, ReadEnd};
use mlx5_kmig::{flag_names, Error, Result, State};

/// VFIO_PCI_BAR2_REGION_INDEX: the VF's device memory.
const BAR2: u32 = 2;
/// Most bytes a saving session may deliver (a bound on a misbehaving driver).
const STREAM_LIMIT: usize = 1 << 30;

fn marker(what: &str, fields: &[(&str, String)]) {
    let mut line = format!("MLX5EMU-KMIG-{what}");
    for (k, v) in fields {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(v);
    }
    println!("{line}");
}

/// A device and the migration state the tool last saw it in.
struct Dev {
    dev: Device,
    state: State,
}

impl Dev {
    fn open(bdf: &str, container: &mut Container) -> Result<Dev> {
        let dev = Device::open(bdf, container)?;
        let flags = dev.migration_flags()?;
        let state = dev.state()?;
        marker(
            "DEVICE",
            &[
                ("bdf", bdf.into()),
                ("flags", format!("{flags:#x}")),
                ("names", flag_names(flags)),
                ("state", state.to_string()),
            ],
        );
        Ok(Dev { dev, state })
    }

    /// One SET to `to` (the kernel walks the FSM path), then GET to confirm.
    fn go(&mut self, to: State) -> Result<Option<DataFd>> {
        let from = self.state;
        let fd = self.dev.set_state(from, to)?;
        let now = self.dev.state()?;
        marker(
            "ARC",
            &[
                ("bdf", self.dev.bdf.clone()),
                ("from", from.to_string()),
                ("to", to.to_string()),
                ("fd", u8::from(fd.is_some()).to_string()),
                ("state", now.to_string()),
            ],
        );
        if now != to {
            return Err(Error::check(format!(
                "{}: SET {from} -> {to} succeeded but GET reports {now}",
                self.dev.bdf
            )));
        }
        self.state = to;
        Ok(fd)
    }

    fn expect_fd(&mut self, to: State) -> Result<DataFd> {
        let from = self.state;
        self.go(to)?.ok_or_else(|| {
            Error::check(format!(
                "{}: {from} -> {to} opened no data fd (it must)",
                self.dev.bdf
            ))
        })
    }

    fn expect_no_fd(&mut self, to: State) -> Result<()> {
        let from = self.state;
        match self.go(to)? {
            None => Ok(()),
            Some(_) => Err(Error::check(format!(
                "{}: {from} -> {to} opened a data fd (it must not)",
                self.dev.bdf
            ))),
        }
    }

    fn bar2(&self) -> Result<Vec<u8>> {
        let r = self.dev.region(BAR2)?;
        let mut buf = vec![0u8; usize::try_from(r.size).unwrap_or(0).min(256 << 20)];
        self.dev.region_read(&r, 0, &mut buf)?;
        Ok(buf)
    }

    fn report_bar2(&self, what: &str) -> Result<Vec<u8>> {
        let b = self.bar2()?;
        marker(
            "BAR2",
            &[
                ("bdf", self.dev.bdf.clone()),
                ("what", what.into()),
                ("size", b.len().to_string()),
                ("digest", format!("{:016x}", codec::digest(&b))),
            ],
        );
        Ok(b)
    }

    fn reset(&mut self) -> Result<()> {
        self.dev.reset(self.state)?;
        let now = self.dev.state()?;
        marker(
            "RESET",
            &[("bdf", self.dev.bdf.clone()), ("state", now.to_string())],
        );
        if now != State::Running {
            return Err(Error::check(format!(
                "{}: after VFIO_DEVICE_RESET the state is {now}, not RUNNING",
                self.dev.bdf
            )));
        }
        self.state = now;
        Ok(())
    }
}

fn report_stream(name: &str, stream: &[u8]) -> Result<()> {
    let recs = codec::records(stream)
        .map_err(|e| Error::check(format!("{name}: the stream does not parse: {e}")))?;
    marker(
        "STREAM",
        &[
            ("name", name.into()),
            ("bytes", stream.len().to_string()),
            ("records", recs.len().to_string()),
            (
                "list",
                recs.iter()
                    .map(|r| format!("{}:{}:{}", r.tag, r.flags, r.size))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("digest", format!("{:016x}", codec::digest(stream))),
        ],
    );
    Ok(())
}

fn precopy(fd: &DataFd, state: State, when: &str) -> Result<(u64, u64)> {
    let (initial, dirty) = fd.precopy_info(state)?;
    marker(
        "PRECOPY",
        &[
            ("when", when.into()),
            ("initial", initial.to_string()),
            ("dirty", dirty.to_string()),
        ],
    );
    Ok((initial, dirty))
}

/// Writes `stream` into `dst`: -> RESUMING, write, -> STOP, -> RUNNING.
fn resume(dst: &mut Dev, stream: &[u8], piece: usize) -> Result<()> {
    if dst.state != State::Stop {
        dst.expect_no_fd(State::Stop)?;
    }
    let fd = dst.expect_fd(State::Resuming)?;
    fd.write_all(stream, piece, State::Resuming)?;
    marker(
        "WROTE",
        &[
            ("bdf", dst.dev.bdf.clone()),
            ("bytes", stream.len().to_string()),
            ("piece", piece.to_string()),
        ],
    );
    dst.expect_no_fd(State::Stop)?;
    drop(fd);
    dst.expect_no_fd(State::Running)
}

fn migrate(src: &str, dst: &str, seed: u64, piece: usize, dump: bool) -> Result<()> {
    let mut container = Container::open()?;
    let mut s = Dev::open(src, &mut container)?;
    let mut d = Dev::open(dst, &mut container)?;
    for dev in [&s, &d] {
        let flags = dev.dev.migration_flags()?;
        let want = mlx5_kmig::MIGRATION_STOP_COPY
            | mlx5_kmig::MIGRATION_P2P
            | mlx5_kmig::MIGRATION_PRE_COPY;
        if flags & want != want {
            return Err(Error::check(format!(
                "{}: migration flags {} lack some of {}",
                dev.dev.bdf,
                flag_names(flags),
                flag_names(want)
            )));
        }
    }

    // A known pattern in the source's device memory.
    let region = s.dev.region(BAR2)?;
    let len = usize::try_from(region.size)
        .ok()
        .filter(|&l| l > 0 && l <= 256 << 20)
        .ok_or_else(|| Error::check(format!("{src}: BAR2 of {} bytes", region.size)))?;
    let pat = codec::pattern(len, seed);
    s.dev.region_write(&region, 0, &pat)?;
    let back = s.report_bar2("pattern")?;
    if back != pat {
        return Err(Error::check(format!(
            "{src}: BAR2 does not read back the pattern written (seed {seed})"
        )));
    }

    // RUNNING_P2P both ways.
    s.expect_no_fd(State::RunningP2p)?;
    s.expect_no_fd(State::Running)?;
    marker(
        "DATA-SIZE",
        &[
            ("bdf", src.into()),
            ("bytes", s.dev.data_size(s.state)?.to_string()),
        ],
    );

    // Pre-copy: PRECOPY_INFO, its data up to the temporary end, PRECOPY_INFO again.
    let fd = s.expect_fd(State::PreCopy)?;
    let mut stream = Vec::new();
    let (initial, _) = precopy(&fd, s.state, "start")?;
    let end = fd.read_until_end(&mut stream, STREAM_LIMIT, s.state)?;
    if end != Some(ReadEnd::NoMsg) {
        return Err(Error::check(format!(
            "{src}: pre-copy read ended with {end:?} after {} bytes; expected ENOMSG (the temporary end)",
            stream.len()
        )));
    }
    let precopy_bytes = stream.len();
    marker("PRECOPY-READ", &[("bytes", precopy_bytes.to_string())]);
    if (precopy_bytes as u64) < initial {
        return Err(Error::check(format!(
            "{src}: pre-copy gave {precopy_bytes} bytes before ENOMSG, fewer than initial_bytes {initial}"
        )));
    }
    let (initial2, _) = precopy(&fd, s.state, "drained")?;
    if initial2 != 0 {
        return Err(Error::check(format!(
            "{src}: initial_bytes {initial2} after reading all pre-copy data"
        )));
    }

    // Stop-copy: the rest of the stream, to its end.
    s.expect_no_fd(State::PreCopyP2p)?;
    s.expect_no_fd(State::StopCopy)?;
    let end = fd.read_until_end(&mut stream, STREAM_LIMIT, s.state)?;
    if end != Some(ReadEnd::Eof) {
        return Err(Error::check(format!(
            "{src}: stop-copy read ended with {end:?}; expected the end of the stream"
        )));
    }
    marker(
        "STOPCOPY-READ",
        &[("bytes", (stream.len() - precopy_bytes).to_string())],
    );
    s.expect_no_fd(State::Stop)?;
    drop(fd);
    report_stream("kernel-stream", &stream)?;

    // Into the destination.
    resume(&mut d, &stream, piece)?;
    let src_mem = s.report_bar2("source-after")?;
    let dst_mem = d.report_bar2("destination")?;
    let equal = src_mem == dst_mem;
    marker("COMPARE", &[("equal", u8::from(equal).to_string())]);
    if !equal {
        let first = src_mem.iter().zip(&dst_mem).position(|(a, b)| a != b);
        return Err(Error::check(format!(
            "{dst}: BAR2 differs from {src}'s after the migration (first difference at {first:?})"
        )));
    }
    s.expect_no_fd(State::Running)?;

    // Reset: back to RUNNING.
    s.reset()?;
    d.reset()?;
    if dump {
        for l in codec::console_lines("kernel-stream", &stream) {
            println!("{l}");
        }
    }
    Ok(())
}

fn load(dst: &str, file: &str, piece: usize) -> Result<()> {
    let stream = std::fs::read(file).map_err(|e| Error::Sys {
        call: "read".into(),
        on: file.into(),
        state: None,
        errno: e.raw_os_error().unwrap_or(0),
    })?;
    report_stream(file, &stream)?;
    let mut container = Container::open()?;
    let mut d = Dev::open(dst, &mut container)?;
    resume(&mut d, &stream, piece)?;
    d.report_bar2("loaded")?;
    Ok(())
}

fn flags(bdfs: &[String]) -> Result<()> {
    let mut container = Container::open()?;
    for b in bdfs {
        Dev::open(b, &mut container)?;
    }
    Ok(())
}

const USAGE: &str = "usage: mlx5-kmig flags BDF... | migrate SRC DST [--seed N] [--piece N] [--dump] | load DST FILE [--piece N]";

/// The parsed command line.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Flags(Vec<String>),
    Migrate {
        src: String,
        dst: String,
        seed: u64,
        piece: usize,
        dump: bool,
    },
    Load {
        dst: String,
        file: String,
        piece: usize,
    },
}

/// Default write size on the resuming fd: odd, so writes straddle record headers.
const DEFAULT_PIECE: usize = 4099;

fn parse(args: &[String]) -> std::result::Result<Cmd, String> {
    let mut pos = Vec::new();
    let mut seed = 1u64;
    let mut piece = DEFAULT_PIECE;
    let mut dump = false;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> std::result::Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name} {v:?}: expected a decimal number"))
        };
        match a.as_str() {
            "--seed" => seed = num("--seed")?,
            "--piece" => {
                piece = usize::try_from(num("--piece")?)
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or("--piece: expected 1 or more bytes")?
            }
            "--dump" => dump = true,
            o if o.starts_with("--") => return Err(format!("unknown option {o:?}")),
            _ => pos.push(a.clone()),
        }
    }
    let (cmd, rest) = pos.split_first().ok_or("no command")?;
    Ok(match (cmd.as_str(), rest) {
        ("flags", r) if !r.is_empty() => Cmd::Flags(r.to_vec()),
        ("migrate", [src, dst]) => Cmd::Migrate {
            src: src.clone(),
            dst: dst.clone(),
            seed,
            piece,
            dump,
        },
        ("load", [dst, file]) => Cmd::Load {
            dst: dst.clone(),
            file: file.clone(),
            piece,
        },
        _ => return Err(format!("bad arguments {rest:?} for {cmd:?}")),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let cmd = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mlx5-kmig: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let r = match cmd {
        Cmd::Flags(b) => flags(&b),
        Cmd::Migrate {
            src,
            dst,
            seed,
            piece,
            dump,
        } => migrate(&src, &dst, seed, piece, dump),
        Cmd::Load { dst, file, piece } => load(&dst, &file, piece),
    };
    match r {
        Ok(()) => {
            marker("OK", &[]);
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line, no spaces lost: the message goes last.
            println!("MLX5EMU-KMIG-ERROR msg={e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        std::iter::once("mlx5-kmig")
            .chain(s.split_whitespace())
            .map(String::from)
            .collect()
    }

    #[test]
    fn command_lines_parse() {
        assert_eq!(
            parse(&args("migrate 0000:00:04.1 0000:00:04.2 --seed 7 --dump")),
            Ok(Cmd::Migrate {
                src: "0000:00:04.1".into(),
                dst: "0000:00:04.2".into(),
                seed: 7,
                piece: DEFAULT_PIECE,
                dump: true
            })
        );
        assert_eq!(
            parse(&args("load 0000:00:04.2 /s --piece 1")),
            Ok(Cmd::Load {
                dst: "0000:00:04.2".into(),
                file: "/s".into(),
                piece: 1
            })
        );
        assert_eq!(
            parse(&args("flags a b")),
            Ok(Cmd::Flags(vec!["a".into(), "b".into()]))
        );
        for bad in [
            "",
            "flags",
            "migrate a",
            "load a",
            "migrate a b --seed",
            "migrate a b --seed x",
            "load a b --piece 0",
            "x --what",
        ] {
            assert!(parse(&args(bad)).is_err(), "{bad:?} parsed");
        }
    }
}

//! The per-message span: fields, nesting of the backend's events, errno on failure.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use super::*;
use crate::client::Client;

#[derive(Default, Debug)]
struct Log {
    /// Every span opened, in order: (name, fields). Keys are positions here, since
    /// the subscriber may reuse the ids of closed spans.
    spans: BTreeMap<u64, (String, BTreeMap<String, String>)>,
    /// Subscriber span id -> position in `spans` of the span holding it now.
    live: BTreeMap<u64, u64>,
    /// (message, position of the span it was emitted in).
    events: Vec<(String, Option<u64>)>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Log>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.insert(
            field.name().to_string(),
            format!("{value:?}").replace('"', ""),
        );
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let name = attrs.metadata().name().to_string();
        let mut log = self.0.lock().unwrap();
        let at = log.spans.len() as u64;
        log.spans.insert(at, (name, fields));
        log.live.insert(id.into_u64(), at);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut log = self.0.lock().unwrap();
        let at = log.live.get(&id.into_u64()).copied();
        if let Some((_, fields)) = at.and_then(|at| log.spans.get_mut(&at)) {
            values.record(&mut Fields(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let msg = fields.remove("message").unwrap_or_default();
        let mut log = self.0.lock().unwrap();
        let parent = ctx
            .event_span(event)
            .and_then(|s| log.live.get(&s.id().into_u64()).copied());
        log.events.push((msg, parent));
    }
}

/// One readable 4 KiB region; reads log an event, reads past 0x800 fail with EIO.
struct Dev;

impl Backend for Dev {
    fn num_regions(&self) -> u32 {
        1
    }
    fn region(&self, index: u32) -> Option<RegionDesc> {
        (index == 0).then(|| RegionDesc {
            flags: VFIO_REGION_INFO_FLAG_READ,
            size: 0x1000,
            ..Default::default()
        })
    }
    fn region_read(&mut self, _index: u32, offset: u64, data: &mut [u8]) -> Result<(), Errno> {
        tracing::info!(offset, "backend read");
        if offset >= 0x800 {
            return Err(Errno::EIO);
        }
        data.fill(0xab);
        Ok(())
    }
}

fn field<'a>(log: &'a Log, span: u64, name: &str) -> Option<&'a str> {
    log.spans[&span].1.get(name).map(String::as_str)
}

#[test]
fn each_message_has_a_span_holding_the_backends_events_and_the_errno() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    let (server_end, client_end) = UnixStream::pair().unwrap();
    let client = std::thread::spawn(move || {
        let mut c = Client::from_stream(client_end).unwrap();
        let mut buf = [0u8; 8];
        c.region_read(0, 0x10, &mut buf).unwrap();
        assert_eq!(buf, [0xab; 8]);
        assert!(c.region_read(0, 0x900, &mut buf).is_err());
        c.shutdown();
    });
    tracing::subscriber::with_default(subscriber, || {
        Connection::new(server_end, ServerConfig::default())
            .run(&mut Dev, &Dma::default())
            .unwrap();
    });
    client.join().unwrap();

    let log = capture.0.lock().unwrap();
    let reads: Vec<u64> = log
        .spans
        .iter()
        .filter(|(_, (name, f))| {
            name == "vfio-user" && f.get("cmd").map(String::as_str) == Some("REGION_READ")
        })
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(reads.len(), 2, "one span per REGION_READ: {log:?}");
    let (ok, failed) = (reads[0], reads[1]);
    // Command, message id and size; the successful one has no errno, the failed one EIO.
    assert_ne!(field(&log, ok, "id"), field(&log, failed, "id"));
    assert_eq!(field(&log, ok, "size"), Some("32"));
    assert_eq!(field(&log, ok, "reply"), Some("24"));
    assert_eq!(field(&log, ok, "errno"), None);
    assert_eq!(
        field(&log, failed, "errno"),
        Some(libc::EIO.to_string().as_str())
    );
    // The backend's events happened inside the span of the message that caused them.
    let backend: Vec<Option<u64>> = log
        .events
        .iter()
        .filter(|(m, _)| m == "backend read")
        .map(|&(_, p)| p)
        .collect();
    assert_eq!(backend, vec![Some(ok), Some(failed)]);
    // VERSION got a span too.
    assert!(log
        .spans
        .values()
        .any(|(n, f)| n == "vfio-user" && f.get("cmd").map(String::as_str) == Some("VERSION")));
}

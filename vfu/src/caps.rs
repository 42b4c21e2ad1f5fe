//! VERSION capabilities: the JSON object both sides send.

use serde_json::{json, Map, Value};

use crate::dma::{DMA_PAGE_SIZE, MAX_DMA_MAPS};
use crate::error::Errno;

/// Most fds we accept in one message.
pub const SERVER_MAX_MSG_FDS: u32 = 16;
/// Most data bytes per REGION_READ/WRITE or MIG_DATA transfer sent to us.
pub const SERVER_MAX_DATA_XFER: u32 = 1 << 20;
/// Upper bound on a client's JSON capabilities text.
pub const MAX_VERSION_JSON: usize = 64 * 1024;
/// Largest `max_bitmap_size` we report in the legacy `migration` object.
const MIGRATION_MAX_BITMAP: u64 = 256 << 20;

/// Spec defaults for absent keys.
const DEFAULT_MAX_MSG_FDS: u32 = 1;
pub const DEFAULT_MAX_DATA_XFER: u32 = 1 << 20;

/// What one side announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub max_msg_fds: u32,
    pub max_data_xfer_size: u32,
    pub max_dma_maps: u32,
    pub pgsizes: u64,
    pub write_multiple: bool,
    /// The legacy `migration` object was present (with or without fields).
    pub migration: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER,
            max_dma_maps: 65535,
            pgsizes: DMA_PAGE_SIZE,
            write_multiple: false,
            migration: false,
        }
    }
}

fn get_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, Errno> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(Errno::EINVAL),
    }
}

fn get_u32(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>, Errno> {
    get_u64(obj, key)?
        .map(|v| u32::try_from(v).map_err(|_| Errno::EINVAL))
        .transpose()
}

impl Capabilities {
    /// Parses the NUL-terminated JSON that follows major/minor. Empty text means every
    /// default. A known key of the wrong type, bad UTF-8, or a missing NUL is `EINVAL`;
    /// unknown keys are ignored (the spec allows later additions).
    pub fn parse(text: &[u8]) -> Result<Self, Errno> {
        let mut caps = Capabilities::default();
        if text.is_empty() {
            return Ok(caps);
        }
        if text.len() > MAX_VERSION_JSON {
            return Err(Errno::E2BIG);
        }
        let body = match text.iter().position(|&b| b == 0) {
            Some(n) => &text[..n],
            None => return Err(Errno::EINVAL),
        };
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(caps);
        }
        let v: Value = serde_json::from_slice(body).map_err(|_| Errno::EINVAL)?;
        let top = v.as_object().ok_or(Errno::EINVAL)?;
        let Some(c) = top.get("capabilities") else {
            return Ok(caps);
        };
        let c = c.as_object().ok_or(Errno::EINVAL)?;
        if let Some(n) = get_u32(c, "max_msg_fds")? {
            caps.max_msg_fds = n;
        }
        if let Some(n) = get_u32(c, "max_data_xfer_size")? {
            caps.max_data_xfer_size = n;
        }
        if let Some(n) = get_u32(c, "max_dma_maps")? {
            caps.max_dma_maps = n;
        }
        if let Some(n) = get_u64(c, "pgsizes")? {
            caps.pgsizes = n;
        }
        if let Some(w) = c.get("write_multiple") {
            caps.write_multiple = w.as_bool().ok_or(Errno::EINVAL)?;
        }
        if let Some(m) = c.get("migration") {
            let m = m.as_object().ok_or(Errno::EINVAL)?;
            // Fields are optional; when present they must be numbers.
            get_u64(m, "pgsize")?;
            get_u64(m, "max_bitmap_size")?;
            caps.migration = true;
        }
        Ok(caps)
    }

    /// What the server answers to a client's proposal: its own limits, and only the
    /// optional features the client offered.
    pub fn server_reply(client: &Capabilities) -> Capabilities {
        Capabilities {
            max_msg_fds: SERVER_MAX_MSG_FDS,
            max_data_xfer_size: SERVER_MAX_DATA_XFER,
            max_dma_maps: MAX_DMA_MAPS as u32,
            pgsizes: DMA_PAGE_SIZE,
            write_multiple: client.write_multiple,
            migration: client.migration,
        }
    }

    /// The client's proposal we send.
    pub fn client_proposal() -> Capabilities {
        Capabilities {
            max_msg_fds: SERVER_MAX_MSG_FDS,
            max_data_xfer_size: SERVER_MAX_DATA_XFER,
            max_dma_maps: MAX_DMA_MAPS as u32,
            pgsizes: DMA_PAGE_SIZE,
            write_multiple: false,
            migration: true,
        }
    }

    /// NUL-terminated JSON text.
    pub fn to_json(&self) -> Vec<u8> {
        let mut c = json!({
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "max_dma_maps": self.max_dma_maps,
            "pgsizes": self.pgsizes,
        });
        if self.write_multiple {
            c["write_multiple"] = json!(true);
        }
        if self.migration {
            c["migration"] =
                json!({"pgsize": DMA_PAGE_SIZE, "max_bitmap_size": MIGRATION_MAX_BITMAP});
        }
        let mut out = serde_json::to_vec(&json!({ "capabilities": c })).expect("json");
        out.push(0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_proposal_parses() {
        let t = br#"{"capabilities":{"pgsizes":4096,"max_msg_fds":16,"max_dma_maps":65535,"max_data_xfer_size":1048576,"migration":{"max_bitmap_size":268435456,"pgsize":4096},"write_multiple":true}}"#;
        let mut v = t.to_vec();
        v.push(0);
        let c = Capabilities::parse(&v).unwrap();
        assert_eq!(c.max_msg_fds, 16);
        assert!(c.write_multiple && c.migration);
    }

    #[test]
    fn migration_object_with_or_without_fields() {
        assert!(
            Capabilities::parse(b"{\"capabilities\":{\"migration\":{}}}\0")
                .unwrap()
                .migration
        );
        assert!(
            Capabilities::parse(b"{\"capabilities\":{\"migration\":{\"pgsize\":4096}}}\0")
                .unwrap()
                .migration
        );
        assert_eq!(
            Capabilities::parse(b"{\"capabilities\":{\"migration\":7}}\0"),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn bad_text_is_einval() {
        assert_eq!(
            Capabilities::parse(b"{\"capabilities\":{}}"),
            Err(Errno::EINVAL)
        );
        assert_eq!(Capabilities::parse(b"{not json\0"), Err(Errno::EINVAL));
        assert_eq!(
            Capabilities::parse(b"{\"capabilities\":{\"max_msg_fds\":\"x\"}}\0"),
            Err(Errno::EINVAL)
        );
        assert_eq!(Capabilities::parse(b"").unwrap(), Capabilities::default());
    }

    #[test]
    fn reply_round_trips() {
        let r = Capabilities::server_reply(&Capabilities::default());
        assert_eq!(Capabilities::parse(&r.to_json()).unwrap(), r);
    }
}

//! The small messages each queue pair carries besides the RDMA WRITEs: round markers and
//! their acknowledgements, keepalives and the reason of a side that gives up. Fixed layout,
//! little endian, one [`SLOT`]-byte buffer each.

/// Bytes per message buffer.
pub(crate) const SLOT: usize = 256;
const MAGIC: u32 = 0x4752_4d46; // "FMRG"
const HEADER: usize = 48;
/// Longest reason an `Abandon` carries.
pub(crate) const MAX_REASON: usize = SLOT - HEADER;

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// Source: every write of this stream posted before me is in your memory once you see
    /// me; acknowledge `ticket`. Carries the stream's running totals.
    Round { ticket: u64, totals: Totals },
    /// Source: as `Round`, and nothing follows.
    Finish { ticket: u64, totals: Totals },
    /// Destination: marker `ticket` seen.
    Ack { ticket: u64 },
    /// Source: still here (the writes themselves are invisible to the destination's CPU).
    Keepalive,
    /// Either side: giving up, because of this.
    Abandon { reason: String },
}

/// Running totals of one stream, as the source counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Pages written.
    pub pages_written: u64,
    /// Never-sent zero pages skipped.
    pub pages_skipped: u64,
    /// RDMA WRITE work requests posted.
    pub writes: u64,
}

impl Message {
    pub(crate) fn encode(&self, out: &mut [u8]) -> usize {
        out[..SLOT].fill(0);
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        let (kind, ticket, totals, reason): (u8, u64, Totals, &str) = match self {
            Message::Round { ticket, totals } => (1, *ticket, *totals, ""),
            Message::Finish { ticket, totals } => (2, *ticket, *totals, ""),
            Message::Ack { ticket } => (3, *ticket, Totals::default(), ""),
            Message::Keepalive => (4, 0, Totals::default(), ""),
            Message::Abandon { reason } => (5, 0, Totals::default(), reason.as_str()),
        };
        out[4] = kind;
        out[8..16].copy_from_slice(&ticket.to_le_bytes());
        out[16..24].copy_from_slice(&totals.pages_written.to_le_bytes());
        out[24..32].copy_from_slice(&totals.pages_skipped.to_le_bytes());
        out[32..40].copy_from_slice(&totals.writes.to_le_bytes());
        let reason = truncate(reason, MAX_REASON);
        out[40..42].copy_from_slice(&(reason.len() as u16).to_le_bytes());
        out[HEADER..HEADER + reason.len()].copy_from_slice(reason.as_bytes());
        HEADER + reason.len()
    }

    pub(crate) fn decode(buf: &[u8]) -> Result<Self, String> {
        if buf.len() < HEADER {
            return Err(format!(
                "message of {} bytes, shorter than a header",
                buf.len()
            ));
        }
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or([0; 8]));
        let magic = u32::from_le_bytes(buf[0..4].try_into().unwrap_or([0; 4]));
        if magic != MAGIC {
            return Err(format!("bad message magic {magic:#x}"));
        }
        let ticket = u64_at(8);
        let totals = Totals {
            pages_written: u64_at(16),
            pages_skipped: u64_at(24),
            writes: u64_at(32),
        };
        Ok(match buf[4] {
            1 => Message::Round { ticket, totals },
            2 => Message::Finish { ticket, totals },
            3 => Message::Ack { ticket },
            4 => Message::Keepalive,
            5 => {
                let len = usize::from(u16::from_le_bytes([buf[40], buf[41]]));
                let text = buf
                    .get(HEADER..HEADER + len)
                    .ok_or_else(|| format!("abandon reason of {len} bytes overruns the message"))?;
                Message::Abandon {
                    reason: String::from_utf8_lossy(text).into_owned(),
                }
            }
            other => return Err(format!("unknown message kind {other}")),
        })
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let totals = Totals {
            pages_written: 7,
            pages_skipped: 9,
            writes: 3,
        };
        let long = "é".repeat(300);
        for message in [
            Message::Round { ticket: 1, totals },
            Message::Finish {
                ticket: u64::MAX,
                totals,
            },
            Message::Ack { ticket: 42 },
            Message::Keepalive,
            Message::Abandon {
                reason: "guest paused too long".into(),
            },
        ] {
            let mut buf = [0u8; SLOT];
            let len = message.encode(&mut buf);
            assert!(len <= SLOT);
            assert_eq!(Message::decode(&buf[..len]).unwrap(), message);
        }
        let mut buf = [0u8; SLOT];
        let len = Message::Abandon { reason: long }.encode(&mut buf);
        let Message::Abandon { reason } = Message::decode(&buf[..len]).unwrap() else {
            panic!("not an abandon");
        };
        assert!(reason.len() <= MAX_REASON && reason.chars().all(|c| c == 'é'));
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(Message::decode(&[0u8; 8]).is_err());
        assert!(Message::decode(&[0u8; SLOT]).unwrap_err().contains("magic"));
        let mut buf = [0u8; SLOT];
        Message::Keepalive.encode(&mut buf);
        buf[4] = 99;
        assert!(Message::decode(&buf).unwrap_err().contains("kind 99"));
        Message::Abandon { reason: "x".into() }.encode(&mut buf);
        buf[40] = 0xff;
        assert!(Message::decode(&buf).unwrap_err().contains("overruns"));
    }
}

/// The private data of a connect request: which transfer and which stream it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub session: u64,
    pub stream: u16,
    pub streams: u16,
}

const HELLO_MAGIC: u32 = 0x4c48_4d46; // "FMHL"
pub(crate) const HELLO_LEN: usize = 16;

impl Hello {
    pub(crate) fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.stream.to_le_bytes());
        out[6..8].copy_from_slice(&self.streams.to_le_bytes());
        out[8..16].copy_from_slice(&self.session.to_le_bytes());
        out
    }

    pub(crate) fn decode(data: &[u8]) -> Result<Self, String> {
        // Connect-request private data is padded by the CM; only the first bytes are ours.
        if data.len() < HELLO_LEN {
            return Err(format!(
                "connect request with {} bytes of private data, not a Ferry stream",
                data.len()
            ));
        }
        if u32::from_le_bytes(data[0..4].try_into().unwrap_or([0; 4])) != HELLO_MAGIC {
            return Err("connect request is not from a Ferry source".into());
        }
        Ok(Self {
            stream: u16::from_le_bytes([data[4], data[5]]),
            streams: u16::from_le_bytes([data[6], data[7]]),
            session: u64::from_le_bytes(data[8..16].try_into().unwrap_or([0; 8])),
        })
    }
}

#[cfg(test)]
mod hello_tests {
    use super::*;

    #[test]
    fn hello_round_trips_through_padded_private_data() {
        let hello = Hello {
            session: 0xdead_beef_0123,
            stream: 3,
            streams: 4,
        };
        let mut padded = hello.encode().to_vec();
        padded.resize(56, 0);
        assert_eq!(Hello::decode(&padded).unwrap(), hello);
        assert!(Hello::decode(&padded[..8]).is_err());
        assert!(
            Hello::decode(&[0u8; 56])
                .unwrap_err()
                .contains("not from a Ferry")
        );
    }
}

//! Parsing sizes and guest addresses as operators type them.

/// Parses a byte size such as `4096`, `64M`, `64MiB`, `1G`, `512k` (binary multiples).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "'{text}' is not a size (expected e.g. 512M, 2G, 4096)"
        ));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{text}' (use K, M, G or T)"
            ));
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Parses an address: decimal, `0x` hex, or a size like `512M`.
pub fn parse_address(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    match trimmed
        .strip_prefix("0x")
        .or_else(|| trimmed.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16)
            .map_err(|_| format!("'{text}' is not a hexadecimal address")),
        None => parse_size(trimmed),
    }
}

/// Parses a transfer rate in bytes per second, as network rates are written: decimal
/// multiples (`200M` = `200MB/s` = 200 000 000 B/s), binary ones with `i` (`64MiB/s`), a
/// fraction allowed (`1.5G`). `/s` is optional.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let body = trimmed.strip_suffix("/s").unwrap_or(trimmed).trim_end();
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, unit) = body.split_at(split);
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| format!("'{text}' is not a rate (expected e.g. 200M, 1.5G, 64MiB/s)"))?;
    let unit = unit.trim();
    let factor: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(format!(
                "unknown rate unit '{unit}' in '{text}' (use K, M, G, T for powers of 1000 or KiB, MiB, GiB for powers of 1024, bytes per second)"
            ));
        }
    };
    let bytes = value * factor;
    if bytes >= u64::MAX as f64 {
        return Err(format!("'{text}' is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Formats a rate in bytes per second with a decimal unit, e.g. `200 MB/s`.
pub fn format_rate(bytes_per_sec: u64) -> String {
    const UNITS: [&str; 5] = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
    let mut value = bytes_per_sec as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats bytes with a binary unit, e.g. `1.5 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size(" 2 GB "), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").unwrap_err().contains("unit"));
        assert!(
            parse_size("99999999999999T")
                .unwrap_err()
                .contains("too large")
        );
        assert!(parse_size("-5").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200M"), Ok(200_000_000));
        assert_eq!(parse_rate("200MB/s"), Ok(200_000_000));
        assert_eq!(parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_rate("64MiB/s"), Ok(64 << 20));
        assert_eq!(parse_rate("500k"), Ok(500_000));
        assert_eq!(parse_rate("12345"), Ok(12345));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("").is_err());
        assert!(parse_rate("1.2.3M").is_err());
        assert!(parse_rate("10Mbit").unwrap_err().contains("unit"));
        assert_eq!(format_rate(200_000_000), "200 MB/s");
        assert_eq!(format_rate(1_500_000_000), "1.5 GB/s");
        assert_eq!(format_rate(999), "999 B/s");
    }

    #[test]
    fn addresses_and_formatting() {
        assert_eq!(parse_address("0x200000"), Ok(0x200000));
        assert_eq!(parse_address("512M"), Ok(512 << 20));
        assert!(parse_address("0xzz").is_err());
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }
}

//! Plain-text tables for ferryctl: every column as wide as its widest cell, numbers to the
//! right, two spaces between columns, no trailing blanks.

/// How a column's cells line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text: to the left.
    Left,
    /// Numbers and sizes: to the right.
    Right,
}

/// A table with a header row; each row has one cell per column (missing cells are blank).
pub fn render(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .map(|c| c.chars().count())
            .chain([columns[i].0.chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..columns.len()).map(width).collect();
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, (w, (_, align)))) in cells.iter().zip(widths.iter().zip(columns)).enumerate()
        {
            if i > 0 {
                out.push_str("  ");
            }
            match align {
                Align::Left => out.push_str(&format!("{cell:<w$}")),
                Align::Right => out.push_str(&format!("{cell:>w$}")),
            }
        }
        out.trim_end().to_string()
    };
    let mut text = line(columns.iter().map(|(h, _)| *h).collect());
    text.push('\n');
    for row in rows {
        let cells = (0..columns.len())
            .map(|i| row.get(i).map_or("", String::as_str))
            .collect();
        text.push_str(&line(cells));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let text = render(
            &[
                ("NAME", Align::Left),
                ("MEMORY", Align::Right),
                ("NOTE", Align::Left),
            ],
            &[
                vec!["a-rather-long-vm-name".into(), "1 GiB".into(), "x".into()],
                vec!["b".into(), "512 MiB".into()],
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME                    MEMORY  NOTE");
        assert_eq!(lines[1], "a-rather-long-vm-name    1 GiB  x");
        assert_eq!(lines[2], "b                      512 MiB");
        // Every column starts at the same place on every line.
        let at = |l: &str, s: &str| l.find(s).unwrap();
        assert_eq!(at(lines[0], "NOTE"), at(lines[1], "x"));
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(render(&[("NAME", Align::Left)], &[]), "NAME\n");
    }
}

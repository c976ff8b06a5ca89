//! Aligned text tables and key/value blocks for people (JSON is for scripts).

pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Columns separated by two spaces; no trailing spaces.
    pub fn render(&self) -> String {
        let cols = self.headers.len();
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, w) in width.iter().enumerate() {
                let cell = r.get(i).map(String::as_str).unwrap_or("");
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < cols {
                    line.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `key:   value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in pairs {
        let key = format!("{k}:");
        out.push_str(format!("{key:<w$}  {v}", w = width).trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_without_trailing_spaces() {
        let mut t = Table::new(&["NAME", "SIZE", "STATE"]);
        t.row(vec!["a".into(), "1 GiB".into(), "healthy".into()]);
        t.row(vec!["longer-name".into(), "512 MiB".into(), "".into()]);
        assert_eq!(
            t.render(),
            "NAME         SIZE     STATE\n\
             a            1 GiB    healthy\n\
             longer-name  512 MiB\n"
        );
    }

    #[test]
    fn key_values_align() {
        assert_eq!(
            key_values(&[("id", "x".into()), ("state", "ok".into()), ("empty", String::new())]),
            "id:     x\nstate:  ok\nempty:\n"
        );
    }
}

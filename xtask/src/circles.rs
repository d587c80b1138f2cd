//! `cargo xtask circles`: fail when the modules of eddy's crates import each other in a circle.
//!
//! The rule: imports point down the flow, never back up, and no two files import each other.
//! This reads each crate's module tree by hand (no compiler, milliseconds, no root): it follows
//! `mod name;` to files, turns every `use` tree and every path that starts with `crate::`,
//! `super::`, `self::`, a child module or a `use`d alias into a file → file edge (following
//! re-exports to the file that defines the item), then reports strongly connected components
//! of files, and of the crate's top-level modules (`store`, `peers`, ...).
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

use crate::util::workspace_root;

/// The crates checked: name and root file, relative to the workspace.
const CRATES: &[(&str, &str)] = &[
    ("agent", "agent/src/lib.rs"),
    ("xtask", "xtask/src/main.rs"),
    ("tests", "tests/src/lib.rs"),
];
/// How many `use` hops a path is followed through (re-exports, aliases, globs).
const MAX_HOPS: u32 = 8;
/// How many cycles are printed for one circle; its other members are listed.
const MAX_CYCLES: usize = 3;

#[derive(clap::Args, Default)]
pub struct Options {}

pub fn run(_: &Options) -> Result<()> {
    let mut failures = 0;
    for (name, root) in CRATES {
        let krate = Crate::load(&workspace_root().join(root), &|p| {
            std::fs::read_to_string(p).ok()
        });
        for warning in &krate.warnings {
            eprintln!("circles: {name}: warning: {warning}");
        }
        let report = krate.report();
        eprintln!(
            "circles: {name}: {} files, {} edges, {} file circles, {} folder circles",
            krate.files.len(),
            report.edges,
            report.files.len(),
            report.folders.len()
        );
        for circle in report.files.iter().chain(&report.folders) {
            eprintln!("  {circle}");
        }
        failures += report.files.len() + report.folders.len();
    }
    if failures > 0 {
        bail!("{failures} import circles (imports point down the flow, never back up)");
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Id(String),
    Str(String),
    P(char),
    Sep, // `::`
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Tokens of Rust source without comments, char literals, lifetimes and numbers.
fn lex(src: &str) -> Vec<Tok> {
    let c: Vec<char> = src.chars().collect();
    let at = |j: usize| c.get(j).copied().unwrap_or('\0');
    let ident_end = |j: usize| (j..).find(|&k| !is_ident(at(k))).unwrap();
    let text = |a: usize, b: usize| c[a.min(c.len())..b.min(c.len())].iter().collect();
    // The end of a string whose body starts at `j`: a quote (and `hashes` #s for raw strings).
    let string_end = |mut j: usize, raw: bool, hashes: usize| {
        while j < c.len() && !(c[j] == '"' && (1..=hashes).all(|k| at(j + k) == '#')) {
            j += if c[j] == '\\' && !raw { 2 } else { 1 };
        }
        j
    };
    let (mut i, mut out) = (0, Vec::new());
    while i < c.len() {
        let (ch, next) = (c[i], at(i + 1));
        if ch == '/' && next == '/' {
            i = (i..c.len()).find(|&j| c[j] == '\n').unwrap_or(c.len());
        } else if ch == '/' && next == '*' {
            let mut depth = 0;
            while i < c.len() {
                let step = (c[i], at(i + 1));
                depth += i32::from(step == ('/', '*')) - i32::from(step == ('*', '/'));
                i += if matches!(step, ('/', '*') | ('*', '/')) {
                    2
                } else {
                    1
                };
                if depth == 0 {
                    break;
                }
            }
        } else if ch == '"' {
            let end = string_end(i + 1, false, 0);
            out.push(Tok::Str(text(i + 1, end)));
            i = end + 1;
        } else if ch == '\'' {
            i = match (next, at(i + 2)) {
                // '\n', '\'', '\u{..}'
                ('\\', _) => (i + 3..).find(|&j| at(j) == '\'' || j >= c.len()).unwrap() + 1,
                (_, '\'') => i + 3,    // 'a'
                _ => ident_end(i + 1), // a lifetime or a loop label
            };
        } else if ch.is_ascii_digit() {
            i = ident_end(i);
        } else if is_ident(ch) || (ch == '$' && is_ident(next)) {
            let start = i + usize::from(ch == '$'); // `$crate` is `crate`
            i = ident_end(start);
            let word: String = text(start, i);
            let hashes = (i..).take_while(|&j| at(j) == '#').count();
            if matches!(word.as_str(), "r" | "br" | "cr") && at(i + hashes) == '"' {
                let end = string_end(i + hashes + 1, true, hashes); // r#"..."#
                out.push(Tok::Str(text(i + hashes + 1, end)));
                i = end + 1 + hashes;
            } else if word == "r" && hashes == 1 && is_ident(at(i + 1)) {
                let start = i + 1; // r#type
                i = ident_end(start);
                out.push(Tok::Id(text(start, i)));
            } else {
                out.push(Tok::Id(word));
            }
        } else if ch == ':' && next == ':' {
            out.push(Tok::Sep);
            i += 2;
        } else {
            if !ch.is_whitespace() {
                out.push(Tok::P(ch));
            }
            i += 1;
        }
    }
    out
}

/// One name a `use` brings in: the full path as written, and the name it binds (None: a glob).
#[derive(Debug)]
struct Use {
    segs: Vec<String>,
    bind: Option<String>,
}

/// Expand one `use` tree (`a::{b, c::D as E, f::*}`) from `toks[*i]` into paths.
fn use_tree(toks: &[Tok], i: &mut usize, mut prefix: Vec<String>, out: &mut Vec<Use>) {
    loop {
        match toks.get(*i) {
            Some(Tok::Sep) => *i += 1,
            Some(Tok::P('*')) => {
                *i += 1;
                return out.push(Use {
                    segs: prefix,
                    bind: None,
                });
            }
            Some(Tok::P('{')) => {
                *i += 1;
                while !matches!(toks.get(*i), None | Some(Tok::P('}'))) {
                    use_tree(toks, i, prefix.clone(), out);
                    if toks.get(*i) == Some(&Tok::P(',')) {
                        *i += 1;
                    }
                }
                *i += 1;
                return;
            }
            Some(Tok::Id(s)) => {
                prefix.push(s.clone());
                *i += 1;
                if toks.get(*i) == Some(&Tok::Sep) {
                    continue;
                }
                if prefix.last().map(String::as_str) == Some("self") && prefix.len() > 1 {
                    prefix.pop(); // `a::{self, B}` binds `a`
                }
                let mut bind = prefix.last().cloned();
                if let (Some(Tok::Id(k)), Some(Tok::Id(alias))) = (toks.get(*i), toks.get(*i + 1)) {
                    if k == "as" {
                        (bind, *i) = (Some(alias.clone()), *i + 2); // `as _` binds `_`: no path
                    }
                }
                return out.push(Use { segs: prefix, bind });
            }
            _ => return,
        }
    }
}

/// A module: a file, or an inline `mod name { ... }` inside one.
#[derive(Debug, Default)]
struct Node {
    name: String,
    parent: Option<usize>,
    file: usize,
    /// Where its `mod child;` files live.
    dir: PathBuf,
    children: BTreeMap<String, usize>,
    /// Names defined here (fn, struct, enum, trait, type, const, static, macro_rules!, ...).
    defs: BTreeSet<String>,
    uses: Vec<Use>,
    /// Other paths with two or more segments, e.g. `crate::store::Store::open`.
    refs: Vec<Vec<String>>,
}

#[derive(Default)]
pub struct Crate {
    src: PathBuf,
    files: Vec<PathBuf>,
    nodes: Vec<Node>,
    warnings: Vec<String>,
}

impl Crate {
    fn load(root: &Path, read: &dyn Fn(&Path) -> Option<String>) -> Crate {
        let src = root.parent().unwrap_or(Path::new("")).to_path_buf();
        let root_node = Node {
            dir: src.clone(),
            ..Node::default()
        };
        let mut krate = Crate {
            src,
            nodes: vec![root_node],
            ..Crate::default()
        };
        match read(root) {
            Some(text) => krate.load_file(root.to_path_buf(), &text, 0, read),
            None => krate
                .warnings
                .push(format!("cannot read {}", root.display())),
        }
        krate
    }

    fn add_node(&mut self, parent: usize, name: &str, file: usize, dir: PathBuf) -> usize {
        let node = Node {
            name: name.into(),
            parent: Some(parent),
            file,
            dir,
            ..Node::default()
        };
        let id = self.nodes.len();
        self.nodes.push(node);
        self.nodes[parent].children.insert(name.into(), id);
        id
    }

    fn load_file(
        &mut self,
        file: PathBuf,
        text: &str,
        node: usize,
        read: &dyn Fn(&Path) -> Option<String>,
    ) {
        self.nodes[node].file = self.files.len();
        self.files.push(file.clone());
        let toks = lex(text);
        let (mut i, mut depth, mut path_attr) = (0, 0, None::<String>);
        let mut stack = vec![(node, 0)]; // the inline modules we are in, and their brace depth
        while i < toks.len() {
            let cur = stack.last().unwrap().0;
            let (next, after) = (toks.get(i + 1), toks.get(i + 2));
            match (&toks[i], next) {
                (Tok::P('#'), _) => {
                    let open = i + 1 + usize::from(next == Some(&Tok::P('!')));
                    let end = close(&toks, open, '[', ']');
                    if let [Tok::Id(k), Tok::P('='), Tok::Str(p)] =
                        &toks[open + 1..end.max(open + 1)]
                    {
                        path_attr = Some(p.clone()).filter(|_| k == "path");
                    }
                    i = end;
                }
                (Tok::Id(k), Some(Tok::P('('))) if k == "pub" => i = close(&toks, i + 1, '(', ')'),
                (Tok::Id(k), _) if k == "use" => {
                    i += 1;
                    use_tree(&toks, &mut i, vec![], &mut self.nodes[cur].uses);
                }
                (Tok::Id(k), Some(Tok::Id(name))) if k == "mod" && after == Some(&Tok::P('{')) => {
                    let dir = self.nodes[cur].dir.join(name);
                    let child = self.add_node(cur, name, self.nodes[node].file, dir);
                    depth += 1;
                    stack.push((child, depth));
                    i += 2;
                }
                (Tok::Id(k), Some(Tok::Id(name))) if k == "mod" && after == Some(&Tok::P(';')) => {
                    let base = &self.nodes[cur].dir;
                    let candidates = match path_attr.take() {
                        Some(p) => vec![file.parent().unwrap_or(Path::new("")).join(p)],
                        None => vec![
                            base.join(format!("{name}.rs")),
                            base.join(name).join("mod.rs"),
                        ],
                    };
                    let found = candidates.iter().find_map(|f| Some((f.clone(), read(f)?)));
                    match found {
                        Some((f, _)) if self.files.contains(&f) => {}
                        Some((f, text)) => {
                            let dir = match f.file_name().and_then(|n| n.to_str()) {
                                Some("mod.rs") => f.parent().unwrap_or(Path::new("")).to_path_buf(),
                                _ => f.with_extension(""),
                            };
                            let child = self.add_node(cur, name, 0, dir);
                            self.load_file(f, &text, child, read);
                        }
                        None => self.warnings.push(format!(
                            "{} declares `mod {name};` but {} does not exist",
                            self.show(self.nodes[node].file),
                            candidates[0].display()
                        )),
                    }
                    i += 2;
                }
                (Tok::Id(k), Some(Tok::Id(name)))
                    if matches!(
                        k.as_str(),
                        "fn" | "struct" | "enum" | "trait" | "type" | "const" | "static" | "union"
                    ) =>
                {
                    self.nodes[cur].defs.insert(name.clone());
                }
                (Tok::Id(k), Some(Tok::P('!'))) if k == "macro_rules" => {
                    if let Some(Tok::Id(name)) = after {
                        self.nodes[cur].defs.insert(name.clone());
                    }
                }
                (Tok::Id(first), Some(Tok::Sep)) if i == 0 || toks[i - 1] != Tok::Sep => {
                    let mut segs = vec![first.clone()];
                    while let (Some(Tok::Sep), Some(Tok::Id(s))) =
                        (toks.get(i + 1), toks.get(i + 2))
                    {
                        segs.push(s.clone());
                        i += 2;
                    }
                    if segs.len() > 1 {
                        self.nodes[cur].refs.push(segs);
                    }
                }
                (Tok::P('{'), _) => depth += 1,
                (Tok::P('}'), _) => {
                    if stack.len() > 1 && stack.last().unwrap().1 == depth {
                        stack.pop();
                    }
                    depth -= 1;
                }
                (Tok::P(';'), _) => path_attr = None,
                _ => {}
            }
            i += 1;
        }
    }
}

/// The index of the token that closes the group opened at `toks[open]`.
fn close(toks: &[Tok], open: usize, left: char, right: char) -> usize {
    let mut depth = 0;
    for (j, t) in toks.iter().enumerate().skip(open) {
        depth += i32::from(*t == Tok::P(left)) - i32::from(*t == Tok::P(right));
        if depth <= 0 {
            return j;
        }
    }
    toks.len()
}

/// The edges and circles of one crate.
struct Report {
    edges: usize,
    files: Vec<String>,
    folders: Vec<String>,
}

type Edges = BTreeMap<(usize, usize), BTreeSet<String>>;

impl Crate {
    /// A file's path relative to the crate's source directory.
    fn show(&self, file: usize) -> String {
        let f = &self.files[file];
        f.strip_prefix(&self.src).unwrap_or(f).display().to_string()
    }

    /// The module a path leads to, and whether it ends at the module itself (not an item in
    /// it). None for paths into other crates and to the module's own items.
    fn resolve(&self, node: usize, segs: &[String], hops: u32) -> Option<(usize, bool)> {
        let n = &self.nodes[node];
        let first = segs.first()?.as_str();
        let supers = segs.iter().take_while(|s| *s == "super").count();
        let (mut cur, mut rest) = match first {
            "crate" => (0, &segs[1..]),
            "self" => (node, &segs[1..]),
            "super" => {
                let up = (0..supers).try_fold(node, |m, _| self.nodes[m].parent)?;
                (up, &segs[supers..])
            }
            _ if n.children.contains_key(first) => (node, segs),
            _ => {
                let alias = n.uses.iter().find(|u| u.bind.as_deref() == Some(first))?;
                if hops >= MAX_HOPS {
                    return None;
                }
                let full: Vec<String> = alias.segs.iter().chain(&segs[1..]).cloned().collect();
                return self.resolve(node, &full, hops + 1);
            }
        };
        while let Some(&child) = rest.first().and_then(|s| self.nodes[cur].children.get(s)) {
            (cur, rest) = (child, &rest[1..]);
        }
        match rest.first() {
            None => Some((cur, true)),
            Some(item) => Some((self.item(cur, item, hops).0, false)),
        }
    }

    /// The module that defines `item`, named in module `node`: follows `use` bindings (the
    /// re-exports) and then globs. The bool: whether it was found rather than assumed.
    fn item(&self, node: usize, item: &str, hops: u32) -> (usize, bool) {
        let n = &self.nodes[node];
        if n.defs.contains(item) || hops >= MAX_HOPS {
            return (node, true);
        }
        if let Some(u) = n.uses.iter().find(|u| u.bind.as_deref() == Some(item)) {
            // A re-export from another crate stays here.
            let target = self.resolve(node, &u.segs, hops + 1).map_or(node, |t| t.0);
            return (target, true);
        }
        for glob in n.uses.iter().filter(|u| u.bind.is_none()) {
            if let Some((module, true)) = self.resolve(node, &glob.segs, hops + 1) {
                if module != node {
                    let (target, found) = self.item(module, item, hops + 1);
                    if found {
                        return (target, true);
                    }
                }
            }
        }
        (node, false)
    }

    /// File → file edges, each with the paths that make it.
    fn edges(&self) -> Edges {
        let mut edges = Edges::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let uses = n.uses.iter().map(|u| (&u.segs, u.bind.is_none()));
            for (segs, glob) in uses.chain(n.refs.iter().map(|r| (r, false))) {
                let Some((target, _)) = self.resolve(i, segs, 0) else {
                    continue;
                };
                let to = self.nodes[target].file;
                if to != n.file {
                    let label = segs.join("::") + if glob { "::*" } else { "" };
                    edges.entry((n.file, to)).or_default().insert(label);
                }
            }
        }
        edges
    }

    /// The top-level module a file belongs to (None for the crate root).
    fn top(&self, file: usize) -> Option<usize> {
        let mut node = self.nodes.iter().position(|n| n.file == file)?;
        while let Some(parent) = self.nodes[node].parent {
            if parent == 0 {
                return Some(node);
            }
            node = parent;
        }
        None
    }

    fn report(&self) -> Report {
        let edges = self.edges();
        let names: Vec<String> = (0..self.files.len()).map(|f| self.show(f)).collect();
        let mut folder_edges = Edges::new();
        let mut tops: Vec<usize> = vec![];
        for ((a, b), labels) in &edges {
            let (Some(ta), Some(tb)) = (self.top(*a), self.top(*b)) else {
                continue;
            };
            if ta != tb {
                let ids = [ta, tb].map(|t| {
                    tops.iter().position(|&x| x == t).unwrap_or_else(|| {
                        tops.push(t);
                        tops.len() - 1
                    })
                });
                let set = folder_edges.entry((ids[0], ids[1])).or_default();
                set.extend(labels.iter().map(|l| format!("{} {l}", names[*a])));
            }
        }
        let top_names: Vec<String> = tops.iter().map(|&t| self.nodes[t].name.clone()).collect();
        Report {
            edges: edges.len(),
            files: circles("files", &names, &edges),
            folders: circles("top-level modules", &top_names, &folder_edges),
        }
    }
}

/// Each circle (strongly connected component of more than one node), as readable cycles.
fn circles(kind: &str, names: &[String], edges: &Edges) -> Vec<String> {
    let mut adj = vec![vec![]; names.len()];
    for &(a, b) in edges.keys() {
        adj[a].push(b);
    }
    let mut out = vec![];
    for mut scc in tarjan(&adj).into_iter().filter(|c| c.len() > 1) {
        scc.sort_by_key(|&v| &names[v]);
        let mut text = format!("circle of {} {kind}:", scc.len());
        let mut covered = BTreeSet::new();
        let mut cycles = 0;
        for &start in &scc {
            if covered.contains(&start) {
                continue;
            }
            cycles += 1;
            if cycles > MAX_CYCLES {
                let rest: Vec<&str> = scc
                    .iter()
                    .filter(|v| !covered.contains(*v))
                    .map(|&v| names[v].as_str())
                    .collect();
                text += &format!("\n    also in it: {}", rest.join(", "));
                break;
            }
            let cycle = shortest_cycle(&adj, start, &scc);
            let shown: Vec<&str> = cycle.iter().map(|&v| names[v].as_str()).collect();
            text += &format!("\n    {}", shown.join(" → "));
            for pair in cycle.windows(2) {
                let labels = &edges[&(pair[0], pair[1])];
                let more = format!("(+{})", labels.len().saturating_sub(3));
                let mut some: Vec<&str> = labels.iter().take(3).map(String::as_str).collect();
                if labels.len() > 3 {
                    some.push(&more);
                }
                let (a, b) = (&names[pair[0]], &names[pair[1]]);
                text += &format!("\n      {a} → {b}: {}", some.join(", "));
            }
            covered.extend(cycle);
        }
        out.push(text);
    }
    out
}

/// The shortest path from `start` back to itself inside `within` (breadth first).
fn shortest_cycle(adj: &[Vec<usize>], start: usize, within: &[usize]) -> Vec<usize> {
    let mut prev: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for &w in adj[v].iter().filter(|w| within.contains(w)) {
            if w == start {
                let mut cycle = vec![start, v];
                while *cycle.last().unwrap() != start {
                    cycle.push(prev[cycle.last().unwrap()]);
                }
                cycle.reverse();
                return cycle;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = prev.entry(w) {
                e.insert(v);
                queue.push_back(w);
            }
        }
    }
    vec![start]
}

/// Tarjan's strongly connected components.
fn tarjan(adj: &[Vec<usize>]) -> Vec<Vec<usize>> {
    struct State<'a> {
        adj: &'a [Vec<usize>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State, v: usize, next: &mut usize) {
        (s.index[v], s.low[v], s.on_stack[v]) = (Some(*next), *next, true);
        *next += 1;
        s.stack.push(v);
        let adj = s.adj;
        for &w in &adj[v] {
            match s.index[w] {
                None => {
                    visit(s, w, next);
                    s.low[v] = s.low[v].min(s.low[w]);
                }
                Some(iw) if s.on_stack[w] => s.low[v] = s.low[v].min(iw),
                Some(_) => {}
            }
        }
        if s.index[v] == Some(s.low[v]) {
            let mut scc = vec![];
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                scc.push(w);
                if w == v {
                    break;
                }
            }
            s.out.push(scc);
        }
    }
    let n = adj.len();
    let mut s = State {
        adj,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: vec![],
        out: vec![],
    };
    let mut next = 0;
    for v in 0..n {
        if s.index[v].is_none() {
            visit(&mut s, v, &mut next);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crate from (path under src/, text) pairs; src/lib.rs is its root.
    fn krate(files: &[(&str, &str)]) -> Crate {
        let files: BTreeMap<PathBuf, String> = files
            .iter()
            .map(|(p, t)| (Path::new("src").join(p), t.to_string()))
            .collect();
        let krate = Crate::load(Path::new("src/lib.rs"), &|p| files.get(p).cloned());
        assert!(krate.warnings.is_empty(), "{:?}", krate.warnings);
        krate
    }

    fn edges(k: &Crate) -> BTreeSet<(String, String)> {
        k.edges()
            .keys()
            .map(|&(a, b)| (k.show(a), k.show(b)))
            .collect()
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.into(), b.into())
    }

    #[test]
    fn a_clean_tree_passes() {
        let k = krate(&[
            ("lib.rs", "pub mod a; pub mod b; pub use a::A;"),
            ("a.rs", "use crate::b::B; pub struct A(B);"),
            ("b.rs", "pub struct B; fn f() -> B { crate::b::B }"),
        ]);
        let want = [pair("lib.rs", "a.rs"), pair("a.rs", "b.rs")];
        assert_eq!(edges(&k), want.into_iter().collect());
        let report = k.report();
        assert!(report.files.is_empty() && report.folders.is_empty());
    }

    #[test]
    fn a_two_file_circle_is_found_with_its_items() {
        let k = krate(&[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "pub struct A; fn f() { crate::b::B::new(); }"),
            ("b.rs", "use super::a::A; pub struct B;"),
        ]);
        let report = k.report();
        assert_eq!(report.files.len(), 1, "{:?}", report.files);
        let text = &report.files[0];
        assert!(text.contains("a.rs → b.rs → a.rs"), "{text}");
        assert!(text.contains("a.rs → b.rs: crate::b::B::new"), "{text}");
        assert!(text.contains("b.rs → a.rs: super::a::A"), "{text}");
        // Top-level file modules are folders too.
        assert_eq!(report.folders.len(), 1);
    }

    #[test]
    fn a_folder_circle_without_a_file_circle_is_found() {
        let k = krate(&[
            ("lib.rs", "pub mod store; pub mod peers;"),
            ("store/mod.rs", "pub mod blob; pub mod index;"),
            ("store/blob.rs", "pub struct Blob;"),
            ("store/index.rs", "use crate::peers::ask::Ask;"),
            ("peers/mod.rs", "pub mod ask; pub mod serve;"),
            ("peers/ask.rs", "pub struct Ask;"),
            ("peers/serve.rs", "use crate::store::blob::Blob;"),
        ]);
        let report = k.report();
        assert!(report.files.is_empty(), "{:?}", report.files);
        assert_eq!(report.folders.len(), 1);
        let text = &report.folders[0];
        assert!(text.contains("peers → store → peers"), "{text}");
        assert!(
            text.contains("store/index.rs crate::peers::ask::Ask"),
            "{text}"
        );
    }

    #[test]
    fn re_exports_aliases_and_globs_lead_to_the_defining_file() {
        let k = krate(&[
            ("lib.rs", "pub mod store; pub mod peers; pub mod app;"),
            (
                "store/mod.rs",
                "mod blob; mod gc; pub use blob::{Blob as B}; pub use gc::*;",
            ),
            ("store/blob.rs", "pub struct Blob;"),
            ("store/gc.rs", "pub fn sweep() {}"),
            ("peers.rs", "use crate::store; fn f() { store::B::open(); }"),
            ("app.rs", "fn f() { crate::store::sweep(); }"),
        ]);
        let got = edges(&k);
        assert!(got.contains(&pair("peers.rs", "store/blob.rs")), "{got:?}");
        assert!(got.contains(&pair("app.rs", "store/gc.rs")), "{got:?}");
        // A `use` of the module itself is an edge to its file; `mod child;` alone is none.
        assert!(got.contains(&pair("peers.rs", "store/mod.rs")), "{got:?}");
        assert!(!got.contains(&pair("lib.rs", "store/mod.rs")), "{got:?}");
        assert!(
            got.contains(&pair("store/mod.rs", "store/blob.rs")),
            "{got:?}"
        );
    }

    #[test]
    fn comments_strings_and_chars_make_no_edges() {
        let k = krate(&[
            ("lib.rs", "mod a; mod b;"),
            (
                "a.rs",
                r###"
                //! Uses crate::b::B in a doc comment.
                // use crate::b::B;
                /* crate::b::B /* nested */ crate::b::B */
                /// See [`crate::b::B`].
                const S: &str = "crate::b::B \" crate::b::B";
                const R: &str = r#"crate::b::"B"#;
                const T: &[u8] = br"crate::b::B\";
                fn f<'a>(x: &'a str) -> (char, char, u8) { ('"', '\'', b'"') }
                fn g() -> &'static str { "crate::b::B" }
                pub struct A;
                "###,
            ),
            ("b.rs", "use crate::a::A;"),
        ]);
        assert_eq!(edges(&k), [pair("b.rs", "a.rs")].into_iter().collect());
    }

    #[test]
    fn use_trees_expand_into_paths_and_bindings() {
        let toks = lex("crate::{a::B, c::{D, E as F}, g::*, h::{self}, i as _};");
        let mut uses = vec![];
        use_tree(&toks, &mut 0, vec![], &mut uses);
        let got: Vec<(String, Option<String>)> = uses
            .iter()
            .map(|u| (u.segs.join("::"), u.bind.clone()))
            .collect();
        let want = [
            ("crate::a::B", Some("B")),
            ("crate::c::D", Some("D")),
            ("crate::c::E", Some("F")),
            ("crate::g", None),
            ("crate::h", Some("h")),
            ("crate::i", Some("_")),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(p, b)| (p.to_string(), b.map(String::from)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn inline_test_modules_path_attributes_and_super_super() {
        let k = krate(&[
            (
                "lib.rs",
                "pub mod a; #[path = \"elsewhere/b.rs\"] pub mod b;",
            ),
            (
                "a.rs",
                "pub mod deep; pub struct A;\n#[cfg(test)]\nmod tests { use super::*; }",
            ),
            ("a/deep.rs", "use super::super::b::B;"),
            (
                "elsewhere/b.rs",
                "pub struct B; #[cfg(test)] mod tests { use super::super::a::A; }",
            ),
        ]);
        let want = [
            pair("a/deep.rs", "elsewhere/b.rs"),
            pair("elsewhere/b.rs", "a.rs"),
        ];
        assert_eq!(edges(&k), want.into_iter().collect());
    }
}

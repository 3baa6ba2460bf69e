//! What a CEL program may cost. Policy conditions and output validators are written by tenants
//! and evaluated on inputs that models and tools shape (call arguments, answers), so neither the
//! program nor its input may make one evaluation unbounded.
//!
//! Parsing and evaluating are recursive, so depth is bounded first: a source is at most
//! [`MAX_SOURCE_BYTES`], is parsed on a thread of its own with a known stack (the parser refuses
//! deep nesting itself, but not before using a lot of stack), and a program nested deeper than
//! [`MAX_DEPTH`] is refused — evaluation then fits any thread's stack.
//!
//! The cost bound is static plus one runtime check, in the spirit of Kubernetes' CEL cost limits:
//! at compile time a program is refused if it has more than [`MAX_NODES`] nodes or nests a
//! comprehension (`all`, `exists`, `map`, `filter`, …) inside another; what is left costs at
//! most `nodes + loop_nodes × elements`, where no list in an input of `n` bytes can have more
//! than `n / 2` elements. Before evaluating, that bound is checked against
//! [`EVALUATION_BUDGET`] for the actual input, and an input too large for the program is refused
//! (a policy then denies, a validator fails) instead of being evaluated.

use cel::common::ast::{EntryExpr, Expr, IdedExpr};

/// Most nodes a program may have.
pub const MAX_NODES: u32 = 1_000;
/// Deepest a program's syntax tree may be (`a && b && c` is three deep).
pub const MAX_DEPTH: u32 = 24;
/// Longest source accepted (the CRDs allow 4096 characters).
pub const MAX_SOURCE_BYTES: usize = 16 * 1024;
/// Deepest bracket nesting a source may have: the parser's own limit counts some brackets and
/// not others, and each level costs it tens of kilobytes of stack.
pub const MAX_BRACKET_DEPTH: usize = 32;
/// Stack of the thread a source is parsed on.
const PARSER_STACK_BYTES: usize = 16 << 20;

/// The deepest nesting of `(`, `[` and `{` in `source`, outside quoted strings.
fn bracket_depth(source: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '(' | '[' | '{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    deepest
}

/// Parses `source` and checks its depth and cost shape; the one way ContextOS compiles CEL a
/// tenant wrote.
pub fn compile_bounded(source: &str) -> Result<(cel::Program, CostShape), String> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(format!(
            "the expression is {} bytes long; at most {MAX_SOURCE_BYTES} are accepted",
            source.len()
        ));
    }
    let depth = bracket_depth(source);
    if depth > MAX_BRACKET_DEPTH {
        return Err(format!(
            "the expression nests brackets {depth} deep; at most {MAX_BRACKET_DEPTH} are accepted"
        ));
    }
    // Whatever is refused is also dropped on that thread: dropping a deep tree recurses too.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cel-parser".into())
            .stack_size(PARSER_STACK_BYTES)
            .spawn_scoped(scope, || {
                let program = cel::Program::compile(source).map_err(|e| format!("does not compile: {e}"))?;
                let shape = CostShape::of(&program)?;
                Ok((program, shape))
            })
            .map_err(|e| format!("cannot start the CEL parser: {e}"))?
            .join()
            .unwrap_or_else(|_| Err("the CEL parser failed on this expression".into()))
    })
}
/// Most work one evaluation may be bounded by (in AST nodes visited).
pub const EVALUATION_BUDGET: u64 = 10_000_000;

/// How a program's cost grows with its input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CostShape {
    /// Nodes of the whole program.
    pub nodes: u32,
    /// Nodes evaluated once per element of a comprehension's range.
    pub loop_nodes: u32,
}

impl CostShape {
    /// The program's shape, or why it is refused.
    pub fn of(program: &cel::Program) -> Result<Self, String> {
        let mut shape = Self::default();
        walk(program.expression(), 0, 1, &mut shape)?;
        if shape.nodes > MAX_NODES {
            return Err(format!(
                "the expression has {} nodes; at most {MAX_NODES} are accepted (split it into several rules)",
                shape.nodes
            ));
        }
        Ok(shape)
    }

    /// The most work evaluating the program on an input of `input_bytes` can take.
    pub fn bound(&self, input_bytes: usize) -> u64 {
        let elements = u64::try_from(input_bytes / 2 + 1).unwrap_or(u64::MAX);
        u64::from(self.nodes).saturating_add(u64::from(self.loop_nodes).saturating_mul(elements))
    }

    /// Refuses an input that could make the evaluation cost more than the budget.
    pub fn check(&self, input_bytes: usize) -> Result<(), String> {
        let bound = self.bound(input_bytes);
        if bound > EVALUATION_BUDGET {
            return Err(format!(
                "not evaluated: on an input of {input_bytes} bytes the expression could cost {bound} steps, more than the {EVALUATION_BUDGET} allowed"
            ));
        }
        Ok(())
    }
}

/// Counts nodes; `loops` is how many comprehensions enclose `expr`, `depth` its depth.
fn walk(expr: &IdedExpr, loops: u32, depth: u32, shape: &mut CostShape) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!(
            "the expression is nested more than {MAX_DEPTH} levels deep; split it into several rules"
        ));
    }
    shape.nodes = shape.nodes.saturating_add(1);
    if shape.nodes > MAX_NODES {
        return Err(format!(
            "the expression has more than {MAX_NODES} nodes; split it into several rules"
        ));
    }
    if loops > 0 {
        shape.loop_nodes = shape.loop_nodes.saturating_add(1);
    }
    let next = depth + 1;
    match &expr.expr {
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => Ok(()),
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                walk(target, loops, next, shape)?;
            }
            call.args.iter().try_for_each(|a| walk(a, loops, next, shape))
        }
        Expr::Comprehension(c) => {
            if loops > 0 {
                return Err(
                    "a comprehension (all, exists, exists_one, map, filter) inside another is not accepted: its cost grows with the product of both lists".into(),
                );
            }
            walk(&c.iter_range, loops, next, shape)?;
            walk(&c.accu_init, loops, next, shape)?;
            walk(&c.result, loops, next, shape)?;
            walk(&c.loop_cond, loops + 1, next, shape)?;
            walk(&c.loop_step, loops + 1, next, shape)
        }
        Expr::List(list) => list.elements.iter().try_for_each(|e| walk(e, loops, next, shape)),
        Expr::Map(map) => map
            .entries
            .iter()
            .try_for_each(|e| entry(&e.expr, loops, next, shape)),
        Expr::Struct(s) => s
            .entries
            .iter()
            .try_for_each(|e| entry(&e.expr, loops, next, shape)),
        Expr::Select(select) => walk(&select.operand, loops, next, shape),
    }
}

fn entry(entry: &EntryExpr, loops: u32, depth: u32, shape: &mut CostShape) -> Result<(), String> {
    match entry {
        EntryExpr::StructField(field) => walk(&field.value, loops, depth, shape),
        EntryExpr::MapEntry(pair) => {
            walk(&pair.key, loops, depth, shape)?;
            walk(&pair.value, loops, depth, shape)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(source: &str) -> Result<CostShape, String> {
        compile_bounded(source).map(|(_, shape)| shape)
    }

    #[test]
    fn simple_conditions_cost_their_nodes() {
        let s = shape("call.risk == 'destructive' && 'sre' in run.groups").expect("accepted");
        assert_eq!(s.loop_nodes, 0);
        assert!(s.check(10 << 20).is_ok(), "no loop: any input size");
    }

    #[test]
    fn a_loop_is_bounded_by_its_input_and_a_nested_loop_is_refused() {
        let s = shape("call.args.items.all(i, i.size < 10)").expect("accepted");
        assert!(s.loop_nodes > 0);
        assert!(s.check(64 << 10).is_ok());
        assert!(
            s.check(64 << 20).is_err(),
            "64 MiB of items is too much for this loop"
        );
        let nested = shape("call.args.a.all(x, call.args.b.exists(y, x == y))");
        assert!(nested.is_err_and(|e| e.contains("inside another")));
    }

    #[test]
    fn huge_and_deep_programs_are_refused_without_exhausting_the_stack() {
        assert!(
            shape(&vec!["1"; 1_100].join(" + ")).is_err_and(|e| e.contains("nested") || e.contains("nodes"))
        );
        // Each of these once overflowed a 2 MiB stack while parsing or evaluating.
        for deep in [
            format!("{}1{}", "(".repeat(2_000), ")".repeat(2_000)),
            format!("{}1{}", "[".repeat(2_000), "]".repeat(2_000)),
            format!("{}1{}", "size(".repeat(800), ")".repeat(800)),
            // Found by the fuzzer: braces the parser's recursion limit does not count.
            format!("a.all(l, size({}{}l))", "{".repeat(110), "}".repeat(110)),
            vec!["1"; 64].join(" + "),
        ] {
            assert!(shape(&deep).is_err(), "{}…", &deep[..20]);
        }
        let wide = vec!["true"; 20].join(" && ");
        let (program, _) = compile_bounded(&wide).expect("twenty conditions in a row are fine");
        // Evaluated on a small stack, as on any worker thread.
        let value = std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || program.execute(&cel::Context::default()).is_ok())
            .expect("thread")
            .join()
            .expect("no overflow");
        assert!(value);
        assert!(shape(&"x".repeat(MAX_SOURCE_BYTES + 1)).is_err_and(|e| e.contains("bytes long")));
    }
}

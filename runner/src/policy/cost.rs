//! What a CEL program may cost. Policy conditions and output validators are written by tenants
//! and evaluated on inputs that models and tools shape (call arguments, answers), so neither the
//! program nor its input may make one evaluation unbounded.
//!
//! The bound is static plus one runtime check, in the spirit of Kubernetes' CEL cost limits:
//! at compile time a program is refused if it has more than [`MAX_NODES`] nodes or nests a
//! comprehension (`all`, `exists`, `map`, `filter`, …) inside another; what is left costs at
//! most `nodes + loop_nodes × elements`, where no list in an input of `n` bytes can have more
//! than `n / 2` elements. Before evaluating, that bound is checked against
//! [`EVALUATION_BUDGET`] for the actual input, and an input too large for the program is refused
//! (a policy then denies, a validator fails) instead of being evaluated.

use cel::common::ast::{EntryExpr, Expr, IdedExpr};

/// Most nodes a program may have.
pub const MAX_NODES: u32 = 1_000;
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
        walk(program.expression(), 0, &mut shape)?;
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

/// Counts nodes; `depth` is how many comprehensions enclose `expr`.
fn walk(expr: &IdedExpr, depth: u32, shape: &mut CostShape) -> Result<(), String> {
    shape.nodes = shape.nodes.saturating_add(1);
    if depth > 0 {
        shape.loop_nodes = shape.loop_nodes.saturating_add(1);
    }
    match &expr.expr {
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => Ok(()),
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                walk(target, depth, shape)?;
            }
            call.args.iter().try_for_each(|a| walk(a, depth, shape))
        }
        Expr::Comprehension(c) => {
            if depth > 0 {
                return Err(
                    "a comprehension (all, exists, exists_one, map, filter) inside another is not accepted: its cost grows with the product of both lists".into(),
                );
            }
            walk(&c.iter_range, depth, shape)?;
            walk(&c.accu_init, depth, shape)?;
            walk(&c.result, depth, shape)?;
            walk(&c.loop_cond, depth + 1, shape)?;
            walk(&c.loop_step, depth + 1, shape)
        }
        Expr::List(list) => list.elements.iter().try_for_each(|e| walk(e, depth, shape)),
        Expr::Map(map) => map.entries.iter().try_for_each(|e| entry(&e.expr, depth, shape)),
        Expr::Struct(s) => s.entries.iter().try_for_each(|e| entry(&e.expr, depth, shape)),
        Expr::Select(select) => walk(&select.operand, depth, shape),
    }
}

fn entry(entry: &EntryExpr, depth: u32, shape: &mut CostShape) -> Result<(), String> {
    match entry {
        EntryExpr::StructField(field) => walk(&field.value, depth, shape),
        EntryExpr::MapEntry(pair) => {
            walk(&pair.key, depth, shape)?;
            walk(&pair.value, depth, shape)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(source: &str) -> Result<CostShape, String> {
        CostShape::of(&cel::Program::compile(source).expect("compiles"))
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
    fn huge_programs_are_refused() {
        let source = vec!["1"; 1_100].join(" + ");
        assert!(shape(&source).is_err_and(|e| e.contains("nodes")));
    }
}

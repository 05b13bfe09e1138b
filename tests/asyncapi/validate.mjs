// Validates an AsyncAPI document with the official parser (@asyncapi/parser:
// the AsyncAPI JSON Schema of the spec version, the AsyncAPI Spectral
// ruleset, and every $ref resolved, ../schemas/*.json included).
//
// Usage: node validate.mjs FILE
// Prints every diagnostic (severity, rule, path, message) and exits 1 if
// any is an error or the document could not be parsed, 0 otherwise.
// Warnings and hints are printed but do not fail, unless --strict is given.
import { resolve } from 'node:path';
import { Parser, fromFile } from '@asyncapi/parser';

const args = process.argv.slice(2);
const strict = args.includes('--strict');
const file = args.find((a) => !a.startsWith('--'));
if (!file) {
  console.error('usage: node validate.mjs [--strict] FILE');
  process.exit(2);
}

// @stoplight/types DiagnosticSeverity.
const SEVERITY = ['error', 'warning', 'info', 'hint'];

const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, resolve(file)).parse({
  validateOptions: { allowedSeverity: { warning: true, info: true, hint: true } },
});

let failed = !document;
for (const d of diagnostics) {
  const severity = SEVERITY[d.severity] ?? String(d.severity);
  const path = (d.path ?? []).join('/');
  console.log(`${severity} ${d.code} ${path}: ${d.message}`);
  if (d.severity === 0 || (strict && d.severity === 1)) failed = true;
}
if (failed) {
  console.log(`INVALID: ${file}`);
  process.exit(1);
}
const channels = document.channels().length;
const operations = document.operations().length;
const messages = document.allMessages().length;
console.log(`VALID: ${file} (AsyncAPI ${document.version()}, ${channels} channels, ${operations} operations, ${messages} messages)`);

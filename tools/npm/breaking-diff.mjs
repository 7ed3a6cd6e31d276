// The one call into api-smart-diff (pinned in package.json), for scripts/breaking.py.
// Reads {"before": document, "after": document} as JSON on stdin and writes the tool's changes as a
// JSON array of {type, action, path, description, before, after}: the value at `path` in each
// document (for a `rename`, the old and the new key). The gate names a change by what it puts in
// place, so that announcing one value never lets another through, and judges the changes the tool
// leaves unclassified (response headers) by the old and new values.
import { apiDiff } from 'api-smart-diff'

let input = ''
for await (const chunk of process.stdin) input += chunk
const { before, after } = JSON.parse(input)
const changes = apiDiff(before, after).map((change) => ({
  type: change.type,
  action: change.action,
  path: change.path,
  description: change.description ?? '',
  before: change.before ?? null,
  after: change.after ?? null,
}))
process.stdout.write(JSON.stringify(changes))

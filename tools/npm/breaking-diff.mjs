// The one call into api-smart-diff (pinned in package.json), for scripts/breaking.py.
// Reads {"before": document, "after": document} as JSON on stdin and writes the tool's changes as a
// JSON array of {type, action, path, description, value}. `value` is what was added, removed or put in
// place; the gate keeps it only for an element of an array (an `enum` value, a `required` name), where
// the index alone does not say which element changed.
import { apiDiff } from 'api-smart-diff'

let input = ''
for await (const chunk of process.stdin) input += chunk
const { before, after } = JSON.parse(input)
const changes = apiDiff(before, after).map((change) => ({
  type: change.type,
  action: change.action,
  path: change.path,
  description: change.description ?? '',
  value: change.action === 'remove' ? change.before : change.after,
}))
process.stdout.write(JSON.stringify(changes))

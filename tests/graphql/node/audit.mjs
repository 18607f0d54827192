// Runs graphql-http's audits against a GraphQL-over-HTTP server and prints them as JSON:
//   node audit.mjs URL   (the API key in CITADEL_AUDIT_KEY, sent as Authorization: Bearer)
import { auditServer } from 'graphql-http';

const url = process.argv[2];
const key = process.env.CITADEL_AUDIT_KEY;
const fetchFn = (input, init = {}) => {
  const headers = new Headers(init.headers);
  if (key) headers.set('authorization', `Bearer ${key}`);
  return fetch(input, { ...init, headers });
};
const results = await auditServer({ url, fetchFn });
const out = [];
for (const result of results) {
  out.push({
    id: result.id,
    name: result.name,
    status: result.status,
    reason: result.status === 'ok' ? null : result.reason,
  });
}
process.stdout.write(JSON.stringify(out));

// A Node.js 20 client of credkeeper's HTTP service (docs/service.md); no dependencies.
//
// Two ways to call the Claude Wrapper API for a user:
//   messages(key, body)          the service attaches fresh credentials and calls the wrapper;
//   callWrapperDirect(key, body) credentials from the service, the wrapper called from here, and
//                                after an auth failure one refresh through the service, one retry.
// This program never refreshes a token itself: refresh tokens are single-use, so a refresh here
// would race the service's and log the user out.
//
//   CREDKEEPER_SERVICE_URL=http://127.0.0.1:8080 CREDKEEPER_API_KEY=... \
//   WRAPPER_URL=https://wrapper.example node credkeeper-client.mjs messages|direct KEY "Hello"
import { pathToFileURL } from "node:url";

// The wrapper runs the CLI for up to 180 s behind a platform that cuts requests at 300 s.
const TIMEOUT_MS = 310_000;

// The CLI's texts for a token it refused, which the wrapper returns as HTTP 200 (credkeeper's own
// classifier, src/credkeeper/_wrapper.py, uses the same list).
const AUTH_FAILURE = new RegExp(
  [
    "please run /login",
    "not logged in",
    "invalid api key",
    "authentication_error",
    "oauth token",
    "failed to authenticate",
    "invalid bearer token",
    "\\b401\\b",
    "does not have access to claude",
    "please login again",
  ].join("|"),
  "i",
);

// Quota texts, checked first: a usage limit must never cost a refresh.
const USAGE_LIMIT =
  /limit reached|hit your (?:\w+ )?limit|usage limit|rate[_ ]limit|quota|api error: 429/i;

/** A failure with a stable `code`: the service's problem code, or one of this client's. */
export class CredkeeperError extends Error {
  constructor(code, detail, status = 0) {
    super(`${code}: ${detail}`);
    this.code = code;
    this.detail = detail;
    this.status = status;
  }
}

/** The service's routes for one application: its URL, its API key, and the wrapper's URL. */
export class CredkeeperClient {
  /** `apiKey` only if the service checks keys; `wrapperUrl` only for callWrapperDirect. */
  constructor({ serviceUrl, apiKey, wrapperUrl } = {}) {
    if (!serviceUrl) throw new TypeError("serviceUrl is required, e.g. http://127.0.0.1:8080");
    this.serviceUrl = serviceUrl.replace(/\/+$/, "");
    this.apiKey = apiKey;
    this.wrapperUrl = wrapperUrl?.replace(/\/+$/, "");
  }

  /** The wrapper's answer to `body` (its /v1/messages body without oauth_credentials). */
  messages(key, body) {
    return this.#service("POST", key, "/messages", body);
  }

  /** `{oauth_credentials, expires_in}`: credentials valid for at least 15 minutes. */
  credentials(key) {
    return this.#service("GET", key, "/credentials");
  }

  /** Fresh credentials after the wrapper refused `failedAccessToken` (one refresh fleet-wide). */
  refresh(key, failedAccessToken) {
    return this.#service("POST", key, "/credentials/refresh", {
      failed_access_token: failedAccessToken,
    });
  }

  /** The wrapper called from here with the service's credentials, again after an auth failure. */
  async callWrapperDirect(key, body) {
    if (!this.wrapperUrl) throw new TypeError("wrapperUrl is required for direct calls");
    let { oauth_credentials: credentials } = await this.credentials(key);
    let answer = await this.#wrapper(body, credentials);
    if (isAuthFailure(answer)) {
      ({ oauth_credentials: credentials } = await this.refresh(key, credentials.access_token));
      answer = await this.#wrapper(body, credentials);
      if (isAuthFailure(answer)) {
        throw new CredkeeperError("wrapper_auth_failed", "the wrapper refused fresh credentials");
      }
    }
    const failure = errorText(answer);
    if (failure !== null) {
      const code = USAGE_LIMIT.test(failure) ? "usage_limit_reached" : "wrapper_error";
      // A wrapper's error can echo the request, tokens included (its CLI timeout prints argv).
      throw new CredkeeperError(code, redact(failure, credentials), answer.status);
    }
    return answer.body;
  }

  async #service(method, key, route, body) {
    const headers = { Accept: "application/json" };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    // A key is one path segment: "billing/alice" travels as "billing%2Falice".
    const url = `${this.serviceUrl}/v1/users/${encodeURIComponent(key)}${route}`;
    const { status, body: answer } = await send(method, url, headers, body);
    if (status >= 400) {
      const code = answer?.code ?? `http_${status}`;
      throw new CredkeeperError(code, answer?.detail ?? "the service failed", status);
    }
    return answer;
  }

  #wrapper(body, credentials) {
    const request = { ...body, oauth_credentials: credentials };
    return send("POST", `${this.wrapperUrl}/v1/messages`, {}, request);
  }
}

async function send(method, url, headers, body) {
  const init = { method, headers: { ...headers }, signal: AbortSignal.timeout(TIMEOUT_MS) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response, text;
  try {
    response = await fetch(url, init);
    text = await response.text();
  } catch (error) {
    const reason = error.cause?.message ?? error.message;
    throw new CredkeeperError("unreachable", `${method} ${new URL(url).origin}: ${reason}`);
  }
  try {
    return { status: response.status, body: JSON.parse(text) };
  } catch {
    return { status: response.status, body: text };
  }
}

function isAuthFailure(answer) {
  const text = answer.status === 200 ? errorText(answer) : null;
  const refused = text !== null && !USAGE_LIMIT.test(text) && AUTH_FAILURE.test(text);
  return answer.status === 401 || refused;
}

/** The wrapper's error text, or null for a reply: HTTP 200 `{"type": "error"}` or any 4xx/5xx. */
function errorText({ status, body }) {
  if (status === 200 && body?.type === "error") return String(body.error?.message ?? "error");
  if (status < 400) return null;
  const detail = body?.detail ?? body;
  return `HTTP ${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
}

function redact(text, credentials) {
  let clean = text;
  for (const token of [credentials.access_token, credentials.refresh_token]) {
    clean = clean.replaceAll(token, "[REDACTED]");
  }
  return clean.replace(/sk-ant-[A-Za-z0-9]+-[A-Za-z0-9_-]+/g, "[REDACTED]");
}

/** The reply's text blocks; a reply that is JSON comes back as the whole body (a wrapper quirk). */
export function replyText(message) {
  if (message?.type === "message" && Array.isArray(message.content)) {
    const texts = message.content.filter((block) => block.type === "text");
    return texts.map((block) => block.text).join("");
  }
  return JSON.stringify(message);
}

async function main([mode, key, prompt]) {
  const { CREDKEEPER_SERVICE_URL, CREDKEEPER_API_KEY, WRAPPER_URL } = process.env;
  const usable = ["messages", "direct"].includes(mode) && key && prompt !== undefined;
  if (!usable || !CREDKEEPER_SERVICE_URL || (mode === "direct" && !WRAPPER_URL)) {
    process.stderr.write(
      'usage: CREDKEEPER_SERVICE_URL=... [CREDKEEPER_API_KEY=...] [WRAPPER_URL=...]\n' +
        '       node credkeeper-client.mjs messages|direct KEY "PROMPT"   (direct: WRAPPER_URL)\n',
    );
    return 2;
  }
  const client = new CredkeeperClient({
    serviceUrl: CREDKEEPER_SERVICE_URL,
    apiKey: CREDKEEPER_API_KEY,
    wrapperUrl: WRAPPER_URL,
  });
  const body = { messages: [{ role: "user", content: prompt }], model: "sonnet" };
  try {
    const message = await (mode === "messages"
      ? client.messages(key, body)
      : client.callWrapperDirect(key, body));
    process.stdout.write(`${replyText(message)}\n`);
    return 0;
  } catch (error) {
    if (!(error instanceof CredkeeperError)) throw error;
    process.stderr.write(`${error.message}\n`);
    return 1;
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.exitCode = await main(process.argv.slice(2));
}

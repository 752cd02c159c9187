// The application's own code for one account's tokens, in the row credkeeper also keeps fresh:
// the guide's `accounts` table, tokens encrypted with app_cipher.mjs, a timestamp expiry and JSON
// scopes. Reading decrypts what credkeeper refreshed; writing is the application's login.
//
//   SECRET_KEY=... node tokens.mjs read  DATABASE_URL TABLE KEY_COLUMN KEY
//   SECRET_KEY=... node tokens.mjs write DATABASE_URL TABLE KEY_COLUMN KEY < tokens.json
//
// Both speak the same JSON, which holds the tokens in clear (this is an example and a test
// program, not something to log): {"access_token", "refresh_token", "expires_at" (ISO 8601),
// "scopes" (an array)}. DATABASE_URL is postgresql://... or mysql://... (MariaDB too); the
// token columns are named access_token, refresh_token, expires_at and scopes.
// Install the drivers first: npm ci --prefix docs/examples/app_cipher
import { readFileSync } from "node:fs";
import mysql from "mysql2/promise";
import pg from "pg";
import { decrypt, encrypt } from "./app_cipher.mjs";

const USAGE = "usage: SECRET_KEY=... node tokens.mjs read|write DATABASE_URL TABLE KEY_COLUMN KEY";

function fail(message) {
  process.stderr.write(`${message}\n`);
  process.exit(2);
}

// One query function for both drivers; SQL uses `?` placeholders, PostgreSQL's become $1, $2...
async function connect(url) {
  if (/^postgres(ql)?:/.test(url)) {
    const client = new pg.Client({ connectionString: url });
    await client.connect();
    return {
      async query(sql, values) {
        let n = 0;
        const result = await client.query(sql.replace(/\?/g, () => `$${++n}`), values);
        return { rows: result.rows, count: result.rowCount };
      },
      end: () => client.end(),
    };
  }
  if (/^(mysql|mariadb):/.test(url)) {
    // DATETIME holds UTC wall-clock time, as credkeeper writes it.
    const uri = url.replace(/^mariadb:/, "mysql:");
    const connection = await mysql.createConnection({ uri, timezone: "Z" });
    return {
      async query(sql, values) {
        const [result] = await connection.execute(sql, values);
        return Array.isArray(result)
          ? { rows: result, count: result.length }
          : { rows: [], count: result.affectedRows };
      },
      end: () => connection.end(),
    };
  }
  fail(`DATABASE_URL must start with postgresql:// or mysql://\n${USAGE}`);
}

async function readTokens(db, table, keyColumn, key, secretKey) {
  const { rows } = await db.query(
    `SELECT access_token, refresh_token, expires_at, scopes FROM ${table} WHERE ${keyColumn} = ?`,
    [key],
  );
  if (rows.length === 0) throw new Error(`no row in ${table} where ${keyColumn} = ${key}`);
  const row = rows[0];
  return {
    access_token: row.access_token && decrypt(row.access_token, secretKey),
    refresh_token: row.refresh_token && decrypt(row.refresh_token, secretKey),
    expires_at: row.expires_at && row.expires_at.toISOString(),
    // pg parses a JSON column; MariaDB's JSON is text.
    scopes: typeof row.scopes === "string" ? JSON.parse(row.scopes) : row.scopes,
  };
}

async function writeTokens(db, table, keyColumn, key, secretKey, tokens) {
  const { count } = await db.query(
    `UPDATE ${table} SET access_token = ?, refresh_token = ?, expires_at = ?, scopes = ?
     WHERE ${keyColumn} = ?`,
    [
      encrypt(tokens.access_token, secretKey),
      encrypt(tokens.refresh_token, secretKey),
      new Date(tokens.expires_at),
      JSON.stringify(tokens.scopes),
      key,
    ],
  );
  if (count === 0) throw new Error(`no row in ${table} where ${keyColumn} = ${key}`);
}

function parseTokens(text) {
  try {
    return JSON.parse(text);
  } catch {
    // JSON.parse's message quotes the input, which holds the tokens.
    throw new Error("stdin must hold the tokens as JSON (see the top of tokens.mjs)");
  }
}

const [command, url, table, keyColumn, key] = process.argv.slice(2);
const secretKey = process.env.SECRET_KEY;
if (!secretKey || !["read", "write"].includes(command) || !key) fail(USAGE);
// Table and column names cannot be bound as parameters, so only plain identifiers are taken.
for (const [name, value] of [["TABLE", table], ["KEY_COLUMN", keyColumn]]) {
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(value)) {
    fail(`${name} must be a plain identifier (letters, digits, _), got ${JSON.stringify(value)}`);
  }
}

async function main() {
  const db = await connect(url);
  try {
    if (command === "read") {
      const tokens = await readTokens(db, table, keyColumn, key, secretKey);
      process.stdout.write(`${JSON.stringify(tokens)}\n`);
    } else {
      const tokens = parseTokens(readFileSync(0, "utf8"));
      await writeTokens(db, table, keyColumn, key, secretKey, tokens);
    }
  } finally {
    await db.end();
  }
}

// The message only: the drivers' messages name a table or column, never a bound value.
main().catch((error) => {
  process.stderr.write(`tokens.mjs ${command}: ${error.message}\n`);
  process.exit(1);
});

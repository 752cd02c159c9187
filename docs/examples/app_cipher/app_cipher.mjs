// The application's own token cipher, as the wrapper guide suggests:
// encryptedRefreshToken = encrypt(refreshToken, SECRET_KEY).
// AES-256-GCM under SHA-256(SECRET_KEY), stored as base64(iv):base64(tag):base64(ciphertext).
// credkeeper reads and writes the same format through app_cipher.py's AppCipher codec;
// tokens.mjs uses this module on the database row the two share.
//
//   node app_cipher.mjs encrypt|decrypt   (SECRET_KEY in the environment, the value on stdin)
import crypto from "node:crypto";
import { readFileSync } from "node:fs";

function keyOf(secretKey) {
  return crypto.createHash("sha256").update(secretKey, "utf8").digest();
}

export function encrypt(text, secretKey) {
  const iv = crypto.randomBytes(12);
  const cipher = crypto.createCipheriv("aes-256-gcm", keyOf(secretKey), iv);
  const body = Buffer.concat([cipher.update(text, "utf8"), cipher.final()]);
  return [iv, cipher.getAuthTag(), body].map((part) => part.toString("base64")).join(":");
}

export function decrypt(payload, secretKey) {
  const [iv, tag, body] = payload.split(":").map((part) => Buffer.from(part, "base64"));
  const decipher = crypto.createDecipheriv("aes-256-gcm", keyOf(secretKey), iv);
  decipher.setAuthTag(tag);
  return Buffer.concat([decipher.update(body), decipher.final()]).toString("utf8");
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [command] = process.argv.slice(2);
  const input = readFileSync(0, "utf8").trim();
  const secretKey = process.env.SECRET_KEY;
  if (!secretKey || !["encrypt", "decrypt"].includes(command)) {
    process.stderr.write("usage: SECRET_KEY=... node app_cipher.mjs encrypt|decrypt < value\n");
    process.exit(2);
  }
  process.stdout.write(command === "encrypt" ? encrypt(input, secretKey) : decrypt(input, secretKey));
}

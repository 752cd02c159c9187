<?php

// A PHP 8.1+ client of credkeeper's HTTP service (docs/service.md) for plain php-cli: HTTP goes
// through file_get_contents with a stream context, so neither curl nor Composer is needed.
//
// Two ways to call the Claude Wrapper API for a user:
//   messages($key, $body)          the service attaches fresh credentials and calls the wrapper;
//   callWrapperDirect($key, $body) credentials from the service, the wrapper called from here,
//                                  then after an auth failure one refresh by the service and retry.
// This program never refreshes a token itself: refresh tokens are single-use, so a refresh here
// would race the service's and log the user out.
//
//   CREDKEEPER_SERVICE_URL=http://127.0.0.1:8080 CREDKEEPER_API_KEY=... \
//   WRAPPER_URL=https://wrapper.example php credkeeper_client.php messages|direct KEY "Hello"

declare(strict_types=1);

/** A failure with a stable code: the service's problem code, or one of this client's. */
final class CredkeeperError extends RuntimeException
{
    public function __construct(
        public readonly string $problemCode,
        public readonly string $detail,
        public readonly int $status = 0,
    ) {
        parent::__construct("{$problemCode}: {$detail}");
    }
}

/** The service's routes for one application: its URL, its API key, and the wrapper's URL. */
final class CredkeeperClient
{
    // The wrapper runs the CLI for up to 180 s behind a platform that cuts requests at 300 s.
    private const TIMEOUT = 310.0;

    // The CLI's texts for a token it refused, which the wrapper returns as HTTP 200 (credkeeper's
    // own classifier, src/credkeeper/_wrapper.py, uses the same list).
    private const AUTH_FAILURE = '~please run /login|not logged in|invalid api key'
        . '|authentication_error|oauth token|failed to authenticate|invalid bearer token'
        . '|\b401\b|does not have access to claude|please login again~i';

    // Quota texts, checked first: a usage limit must never cost a refresh.
    private const USAGE_LIMIT =
        '~limit reached|hit your (?:\w+ )?limit|usage limit|rate[_ ]limit|quota|api error: 429~i';

    private readonly string $serviceUrl;
    private readonly ?string $wrapperUrl;

    /** $apiKey only if the service checks keys; $wrapperUrl only for callWrapperDirect(). */
    public function __construct(
        string $serviceUrl,
        private readonly ?string $apiKey = null,
        ?string $wrapperUrl = null,
    ) {
        $this->serviceUrl = rtrim($serviceUrl, '/');
        $this->wrapperUrl = $wrapperUrl === null ? null : rtrim($wrapperUrl, '/');
    }

    /** The wrapper's answer to $body (its /v1/messages body without oauth_credentials). */
    public function messages(string $key, array $body): mixed
    {
        return $this->service('POST', $key, '/messages', $body);
    }

    /** ['oauth_credentials' => [...], 'expires_in' => seconds], valid for at least 15 minutes. */
    public function credentials(string $key): array
    {
        return $this->service('GET', $key, '/credentials');
    }

    /** Fresh credentials after the wrapper refused $failedAccessToken (one refresh fleet-wide). */
    public function refresh(string $key, string $failedAccessToken): array
    {
        $body = ['failed_access_token' => $failedAccessToken];
        return $this->service('POST', $key, '/credentials/refresh', $body);
    }

    /** The wrapper called from here with the service's credentials, again after an auth failure. */
    public function callWrapperDirect(string $key, array $body): mixed
    {
        if ($this->wrapperUrl === null) {
            throw new LogicException('a wrapper URL is required for direct calls');
        }
        $credentials = $this->credentials($key)['oauth_credentials'];
        [$status, $answer] = $this->wrapper($body, $credentials);
        if (self::isAuthFailure($status, $answer)) {
            $credentials = $this->refresh($key, $credentials['access_token'])['oauth_credentials'];
            [$status, $answer] = $this->wrapper($body, $credentials);
            if (self::isAuthFailure($status, $answer)) {
                $detail = 'the wrapper refused fresh credentials';
                throw new CredkeeperError('wrapper_auth_failed', $detail);
            }
        }
        $failure = self::errorText($status, $answer);
        if ($failure !== null) {
            $limit = preg_match(self::USAGE_LIMIT, $failure) === 1;
            $code = $limit ? 'usage_limit_reached' : 'wrapper_error';
            // A wrapper's error can echo the request and its tokens (its CLI timeout prints argv).
            throw new CredkeeperError($code, self::redact($failure, $credentials), $status);
        }
        return $answer;
    }

    /** The reply's text blocks; a reply that is JSON is the whole body (a wrapper quirk). */
    public static function replyText(mixed $message): string
    {
        if (is_array($message) && ($message['type'] ?? null) === 'message') {
            $isText = fn ($block) => ($block['type'] ?? null) === 'text';
            $texts = array_filter($message['content'] ?? [], $isText);
            return implode('', array_column($texts, 'text'));
        }
        return json_encode($message, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
    }

    private function service(string $method, string $key, string $route, ?array $body = null): mixed
    {
        $headers = ['Accept: application/json'];
        if ($this->apiKey !== null && $this->apiKey !== '') {
            $headers[] = "Authorization: Bearer {$this->apiKey}";
        }
        // A key is one path segment: "billing/alice" travels as "billing%2Falice".
        $url = "{$this->serviceUrl}/v1/users/" . rawurlencode($key) . $route;
        [$status, $answer] = self::send($method, $url, $headers, $body);
        if ($status >= 400) {
            $code = $answer['code'] ?? "http_{$status}";
            throw new CredkeeperError($code, $answer['detail'] ?? 'the service failed', $status);
        }
        return $answer;
    }

    private function wrapper(array $body, array $credentials): array
    {
        $request = array_merge($body, ['oauth_credentials' => $credentials]);
        return self::send('POST', "{$this->wrapperUrl}/v1/messages", [], $request);
    }

    /** [HTTP status, the body decoded from JSON, or as text when it is not JSON]. */
    private static function send(string $method, string $url, array $headers, ?array $body): array
    {
        $http = ['method' => $method, 'timeout' => self::TIMEOUT, 'protocol_version' => 1.1];
        // Without it a 4xx or 5xx gives false instead of the problem document.
        $http['ignore_errors'] = true;
        $headers[] = 'Connection: close';
        if ($body !== null) {
            $headers[] = 'Content-Type: application/json';
            $http['content'] = json_encode($body, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES);
        }
        $http['header'] = $headers;
        $text = @file_get_contents($url, false, stream_context_create(['http' => $http]));
        if ($text === false) {
            $origin = preg_replace('~^([a-z]+://[^/]+).*$~i', '$1', $url);
            $reason = preg_replace('/^.*: /', '', error_get_last()['message'] ?? 'no answer');
            throw new CredkeeperError('unreachable', "{$method} {$origin}: {$reason}");
        }
        // PHP 8.5 deprecates the variable PHP 8.4's function replaces, unless the code assigns it.
        if (function_exists('http_get_last_response_headers')) {
            $http_response_header = http_get_last_response_headers();
        }
        // Each response's status line, redirects included, in order: the last one is the answer.
        $status = 0;
        foreach ($http_response_header as $line) {
            if (preg_match('~^HTTP/\S+ (\d{3})~', $line, $match) === 1) {
                $status = (int) $match[1];
            }
        }
        try {
            return [$status, json_decode($text, true, 512, JSON_THROW_ON_ERROR)];
        } catch (JsonException) {
            return [$status, $text];
        }
    }

    private static function isAuthFailure(int $status, mixed $answer): bool
    {
        $text = $status === 200 ? self::errorText($status, $answer) : null;
        $refused = $text !== null && preg_match(self::USAGE_LIMIT, $text) === 0
            && preg_match(self::AUTH_FAILURE, $text) === 1;
        return $status === 401 || $refused;
    }

    /** The wrapper's error text, or null for a reply: HTTP 200 {"type": "error"} or any 4xx/5xx. */
    private static function errorText(int $status, mixed $answer): ?string
    {
        if ($status === 200 && is_array($answer) && ($answer['type'] ?? null) === 'error') {
            return (string) ($answer['error']['message'] ?? 'error');
        }
        if ($status < 400) {
            return null;
        }
        $detail = is_array($answer) ? ($answer['detail'] ?? $answer) : $answer;
        return "HTTP {$status}: " . (is_string($detail) ? $detail : json_encode($detail));
    }

    private static function redact(string $text, array $credentials): string
    {
        $sent = [$credentials['access_token'], $credentials['refresh_token']];
        $clean = str_replace($sent, '[REDACTED]', $text);
        return preg_replace('/sk-ant-[A-Za-z0-9]+-[A-Za-z0-9_-]+/', '[REDACTED]', $clean);
    }
}

function credkeeper_client_main(array $argv): int
{
    [, $mode, $key, $prompt] = array_pad($argv, 4, null);
    $serviceUrl = getenv('CREDKEEPER_SERVICE_URL') ?: null;
    $wrapperUrl = getenv('WRAPPER_URL') ?: null;
    $usable = in_array($mode, ['messages', 'direct'], true) && $key !== null && $prompt !== null;
    if (!$usable || $serviceUrl === null || ($mode === 'direct' && $wrapperUrl === null)) {
        fwrite(STDERR, "usage: CREDKEEPER_SERVICE_URL=... [CREDKEEPER_API_KEY=...] \\\n"
            . "       [WRAPPER_URL=...] php credkeeper_client.php messages|direct KEY \"PROMPT\"\n"
            . "       (direct needs WRAPPER_URL)\n");
        return 2;
    }
    $client = new CredkeeperClient($serviceUrl, getenv('CREDKEEPER_API_KEY') ?: null, $wrapperUrl);
    $body = ['messages' => [['role' => 'user', 'content' => $prompt]], 'model' => 'sonnet'];
    try {
        $message = $mode === 'messages'
            ? $client->messages($key, $body)
            : $client->callWrapperDirect($key, $body);
    } catch (CredkeeperError $error) {
        fwrite(STDERR, $error->getMessage() . "\n");
        return 1;
    }
    echo CredkeeperClient::replyText($message), "\n";
    return 0;
}

if (PHP_SAPI === 'cli' && realpath($_SERVER['SCRIPT_FILENAME'] ?? '') === __FILE__) {
    exit(credkeeper_client_main($argv));
}

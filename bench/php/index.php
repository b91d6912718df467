<?php
// The three benchmark apps of bench/apps.py written in PHP, one front controller for all:
// the pool's env[BENCH_APP] picks the app, so nginx needs one SCRIPT_FILENAME only.
// The bodies are byte for byte the ones the WSGI servers answer.
$app = getenv('BENCH_APP') ?: 'hello';
if ($app === 'hello') {
    $type = 'text/plain';
    $body = 'Hello, World!';
} elseif ($app === 'page') {
    $type = 'text/html; charset=utf-8';
    $head = "<!DOCTYPE html>\n<html><head><title>bench page</title></head><body>\n";
    $tail = "</body></html>\n";
    $para = "<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.</p>\n";
    $room = 16 * 1024 - strlen($head) - strlen($tail);
    $paras = str_repeat($para, intdiv($room, strlen($para)));
    $body = $head . $paras . str_repeat(' ', $room - strlen($paras)) . $tail;
} else {
    $type = 'text/plain';
    $body = (string) strlen(file_get_contents('php://input'));
}
header('Content-Type: ' . $type);
header('Content-Length: ' . strlen($body));
echo $body;

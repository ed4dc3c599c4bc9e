#!/usr/bin/perl
# Sign a message with Perl's Mail::DKIM (Debian's libmail-dkim-perl): the DKIM signer
# that is not monomail's, for tests/test_inbound.py.
#
#   dkim_sign.pl KEYFILE DOMAIN SELECTOR < message > signed
#
# The message is read from standard input (LF or CRLF line endings) and written to
# standard output with its new DKIM-Signature field on top, every line ending in CRLF
# (ready for SMTP DATA). rsa-sha256, relaxed/relaxed; the fields signed are From, To,
# Subject, Date and Message-ID.
use strict;
use warnings;
use Mail::DKIM::Signer;
use Mail::DKIM::TextWrap;

my ($keyfile, $domain, $selector) = @ARGV;
die "usage: $0 KEYFILE DOMAIN SELECTOR < message\n" unless defined $selector;

my $dkim = Mail::DKIM::Signer->new(
    Algorithm => "rsa-sha256",
    Method    => "relaxed/relaxed",
    Domain    => $domain,
    Selector  => $selector,
    KeyFile   => $keyfile,
    Headers   => "from:to:subject:date:message-id",
);
binmode STDIN;
binmode STDOUT;
my @lines;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z//;
    push @lines, $line;
    $dkim->PRINT("$line\r\n");
}
$dkim->CLOSE;
my $signature = $dkim->signature or die "no signature made\n";
my $field = $signature->as_string;
$field =~ s/\r?\n/\r\n/g;
print "$field\r\n";
print "$_\r\n" for @lines;

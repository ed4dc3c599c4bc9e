#!/usr/bin/perl
# Seal the message on standard input with Mail::DKIM::ARC::Signer (an ARC set made by an
# implementation other than monomail's, for the ARC tests), and print the sealed message.
#
#   perl arc_verify_seal.pl KEYFILE DOMAIN SELECTOR SRVID < message > sealed
#
# The chain value is taken from the message's Authentication-Results for SRVID (none when
# it says nothing about arc). Exit status 0 when the message was sealed.
use strict;
use warnings;
use Mail::DKIM::ARC::Signer;
use Mail::DKIM::TextWrap;

my ($keyfile, $domain, $selector, $srvid) = @ARGV;
die "usage: $0 KEYFILE DOMAIN SELECTOR SRVID < message\n" unless defined $srvid;
my $signer = Mail::DKIM::ARC::Signer->new(
    Algorithm => 'rsa-sha256', Chain => 'ar', Domain => $domain, SrvId => $srvid,
    Selector => $selector, KeyFile => $keyfile, Headers => 'from:to:subject:date:message-id');
binmode STDIN;
binmode STDOUT;
my $message = '';
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $message .= $line;
    $signer->PRINT($line);
}
$signer->CLOSE;
die "not sealed: " . ($signer->result_detail // '') . "\n" unless $signer->result eq 'sealed';
print $signer->as_string, $message;
exit 0;

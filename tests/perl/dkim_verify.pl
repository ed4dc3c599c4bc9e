#!/usr/bin/perl
# Verify every DKIM signature of the message on standard input with Mail::DKIM
# (Debian's libmail-dkim-perl), asking the DNS server at HOST:PORT for the keys.
#
#   perl dkim_verify.pl HOST PORT < message
#
# Prints one line per signature, "RESULT DOMAIN SELECTOR ALGORITHM (DETAIL)", then
# "overall RESULT". Exit status 0 when the overall result is pass, 1 otherwise.
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my ($host, $port) = @ARGV;
die "usage: $0 HOST PORT < message\n" unless defined $port;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => [$host], port => $port, recurse => 1, tcp_timeout => 5, udp_timeout => 5, retry => 1));

my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;    # Mail::DKIM wants CRLF line endings
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    printf "%s %s %s %s (%s)\n", $sig->result, $sig->domain // '-', $sig->selector // '-',
        $sig->algorithm // '-', $sig->result_detail // '';
}
print "overall ", $dkim->result, "\n";
exit($dkim->result eq 'pass' ? 0 : 1);
